"""From a finished run to a deployed model: :mod:`~kdlab.deploy.export` (state_dict,
TorchScript, torch.export, ONNX, int8, with parity checks) and :mod:`~kdlab.deploy.latency`
(per-runtime latency in isolated processes). Both read runs through :mod:`kdlab.runs`."""
