"""Config loading: inheritance, overrides, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.config import apply_overrides, load_config, parse_override, read_yaml
from kdlab.core.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_inheritance_deep_merges(tmp_path: Path) -> None:
    write(tmp_path / "_base.yaml", "optim: {lr: 0.05, epochs: 240}\ndata: {name: cifar100}\n")
    f = write(tmp_path / "exp.yaml",
              "_base_: _base.yaml\nstudent: {arch: resnet8x4}\noptim: {lr: 0.01}\n")
    cfg = load_config(f)
    assert cfg.optim.lr == 0.01 and cfg.optim.epochs == 240
    assert cfg.data.name == "cifar100" and cfg.student.arch == "resnet8x4"


def test_inheritance_loop_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        read_yaml(tmp_path / "a.yaml")


def test_dotted_overrides_parse_yaml_values(tmp_path: Path) -> None:
    f = write(tmp_path / "e.yaml", "student: {arch: resnet8}\n")
    cfg = load_config(f, ["optim.lr=0.1", "optim.milestones=[1, 2]",
                          "method.params.beta=6", "teacher.arch=resnet20"])
    assert cfg.optim.lr == 0.1 and cfg.optim.milestones == [1, 2]
    assert cfg.method.params == {"beta": 6}
    assert cfg.teacher is not None and cfg.teacher.arch == "resnet20"
    assert parse_override("a.b=") == (["a", "b"], None)
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])


def test_unknown_key_names_key_and_allowed_keys(tmp_path: Path) -> None:
    f = write(tmp_path / "e.yaml", "student: {arch: resnet8}\noptim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "optim.lrr" in msg and "lr" in msg and "weight_decay" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("data.name=imagenet22k", "data.name"),
        ("runtime.amp=fp8", "runtime.amp"),
        ("optim.milestones=[10, 5]", "optim.milestones"),
        ("data.batch_size=abc", "data.batch_size"),
        ("optim.clip_grad_norm=-3", "optim.clip_grad_norm"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, override: str, fragment: str) -> None:
    f = write(tmp_path / "e.yaml", "student: {arch: resnet8}\n")
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(f, [override])


def test_missing_student_is_required(tmp_path: Path) -> None:
    f = write(tmp_path / "e.yaml", "optim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="'student' is required"):
        load_config(f)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    f = write(tmp_path / "bad.yaml", "student: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_fingerprint_ignores_speed_knobs_only(tmp_path: Path) -> None:
    f = write(tmp_path / "e.yaml", "student: {arch: resnet8}\n")
    base = load_config(f).fingerprint()
    assert load_config(f, ["runtime.threads=1", "runtime.log_every=7"]).fingerprint() == base
    assert load_config(f, ["runtime.compile=true", "runtime.compile_mode=reduce-overhead"]
                       ).fingerprint() == base
    assert load_config(f, ["optim.lr=0.2"]).fingerprint() != base


def test_compile_mode_is_validated(tmp_path: Path) -> None:
    f = write(tmp_path / "e.yaml", "student: {arch: resnet8}\n")
    assert load_config(f, ["runtime.compile_mode=max-autotune"]).runtime.compile_mode == (
        "max-autotune")
    with pytest.raises(ConfigError, match="compile_mode"):
        load_config(f, ["runtime.compile_mode=cudagraph"])


def test_non_finite_policy_can_change_on_resume(tmp_path: Path) -> None:
    f = write(tmp_path / "e.yaml", "student: {arch: resnet8}\n")
    base = load_config(f).fingerprint()
    assert load_config(f, ["runtime.non_finite=skip",
                           "runtime.max_skipped_steps=3"]).fingerprint() == base


def test_auto_amp_needs_native_bf16(monkeypatch) -> None:
    import torch

    from kdlab.core import env, runtime

    monkeypatch.setattr(env, "cpu_flags", lambda: {"avx512f", "avx512bw"})
    assert runtime.resolve_amp("auto", torch.device("cpu")) is None
    monkeypatch.setattr(env, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    assert runtime.resolve_amp("auto", torch.device("cpu")) is expected
    assert runtime.resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    assert runtime.resolve_amp("off", torch.device("cpu")) is None


# --------------------------------------------------------------------------- strict YAML loading
def test_duplicate_keys_are_errors_at_any_level(tmp_path: Path) -> None:
    """PyYAML's SafeLoader keeps the last of two equal keys; kdlab's loader names the key and
    both lines, in configs, their ``_base_`` files, sweep specs and ``--set`` values."""
    from kdlab.sweep import load_spec

    top = write(tmp_path / "top.yaml", "student: {arch: resnet8}\nseed: 1\nseed: 2\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(top)
    assert str(e.value) == (f"config file {top.resolve()} line 3: duplicate key 'seed' "
                            "(first at line 2)")
    nested = write(tmp_path / "nested.yaml",
                   "student: {arch: resnet8}\nmethod:\n  name: kd\n  partners:\n"
                   "    - name: crd\n      params:\n        nce_k: 8\n"
                   "\n        nce_k: 16\n")
    with pytest.raises(ConfigError, match=r"line 9: duplicate key 'nce_k' \(first at line 7\)"):
        load_config(nested)
    write(tmp_path / "_base.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n")
    child = write(tmp_path / "child.yaml", "_base_: _base.yaml\nstudent: {arch: resnet8}\n")
    with pytest.raises(ConfigError, match=r"_base\.yaml line 3: duplicate key 'lr'"):
        load_config(child)
    flow = write(tmp_path / "flow.yaml", "student: {arch: resnet8, arch: resnet20}\n")
    with pytest.raises(ConfigError, match="line 1: duplicate key 'arch'"):
        load_config(flow)
    spec = write(tmp_path / "s.sweep.yaml", "name: s\nconfigs: [top.yaml]\nseeds: [0]\n"
                 "name: t\n")
    with pytest.raises(ConfigError, match=r"sweep spec .*s\.sweep\.yaml line 4: duplicate key "
                                          r"'name' \(first at line 1\)"):
        load_spec(spec)
    with pytest.raises(ConfigError, match="duplicate key 'beta' in the value"):
        parse_override("method.params={beta: 1, beta: 2}")
    # a merge key's values may still be overridden (YAML's intent), and equal values in
    # different mappings are no duplicates
    ok = write(tmp_path / "ok.yaml", "student: {arch: resnet8}\nmethod: {name: kd, params: "
               "&p {temperature: 4}}\noptim: {lr: 0.1}\ndata: {name: synthetic}\n"
               "_x: {<<: *p, temperature: 2}\n")
    assert read_yaml(ok)["_x"] == {"temperature": 2}


@pytest.mark.parametrize(("base", "found"), [
    ("3", "found a number (3)"),
    ("{file: a.yaml}", "found a mapping ({'file': 'a.yaml'})"),
    ("[a.yaml, 7]", "found a number (7) as item 1 of the list"),
    ("[a.yaml, [b.yaml]]", "found a list (['b.yaml']) as item 1 of the list"),
    ("", "found null"),
    ("''", "found an empty string"),
])
def test_base_must_be_a_path_or_a_list_of_paths(tmp_path: Path, base: str, found: str) -> None:
    write(tmp_path / "a.yaml", "seed: 1\n")
    f = write(tmp_path / "e.yaml", f"_base_: {base}\nstudent: {{arch: resnet8}}\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(f)
    assert str(e.value) == (f"config file {f.resolve()}: _base_ must be a path or a list of "
                            f"paths (strings), {found}")


def test_missing_or_directory_base_names_the_file_that_asked(tmp_path: Path) -> None:
    f = write(tmp_path / "sub" / "e.yaml", "_base_: [../a.yaml]\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(f)
    assert str(e.value) == (f"config file {f.resolve()}: _base_ '../a.yaml' not found (looked "
                            f"for {(tmp_path / 'a.yaml').resolve()})")
    (tmp_path / "a.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"e\.yaml: _base_ '\.\./a\.yaml' is a directory"):
        read_yaml(f)


def test_unreadable_config_files_are_one_line(tmp_path: Path) -> None:
    """Invalid YAML keeps its line and is one line; non-UTF-8 bytes, a directory, a list or a
    scalar at the top level name the file."""
    bad = write(tmp_path / "bad.yaml", "student: {arch: resnet8}\noptim: [unclosed\nseed: 1\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(bad)
    msg = str(e.value)
    assert msg.startswith(f"config file {bad.resolve()} line 3 is not valid YAML: ") and \
        "\n" not in msg
    (tmp_path / "latin1.yaml").write_bytes(b"student: {arch: resnet8}\nname: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml line 2 is not UTF-8 text \(byte 0xe9\)"):
        read_yaml(tmp_path / "latin1.yaml")
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"folder\.yaml is a directory"):
        read_yaml(tmp_path / "folder.yaml")
    for text, kind in (("- a\n- b\n", "a list"), ("false\n", "a boolean"), ("3\n", "a number")):
        f = write(tmp_path / "top.yaml", text)
        with pytest.raises(ConfigError, match=f"must hold a mapping .*, found {kind}$"):
            read_yaml(f)
    assert read_yaml(write(tmp_path / "empty.yaml", "# nothing yet\n")) == {}
