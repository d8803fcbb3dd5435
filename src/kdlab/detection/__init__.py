"""Object detection (issue 15, in progress): pure-PyTorch detection kernels so far.

Nothing here imports torchvision; classification code never imports this package.
"""
