"""Client-named paths resolve inside the server's roots: '..' and symlinks are followed first, and
errors name the key, the roots and the rule, never where a path pointed."""
from __future__ import annotations

import os

import pytest

from services.common.paths import PathOutsideRoot, Roots, config_file
from services.common.rpc import InvalidArgument


@pytest.fixture
def tree(tmp_path):
    root, outside = tmp_path / "output", tmp_path / "elsewhere"
    (root / "runs").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP-SECRET-CONTENT")
    (root / "escape").symlink_to(outside)                 # a symlink inside the root that points out
    (root / "inner").symlink_to(root / "runs")            # one that stays inside
    (tmp_path / "output-evil").mkdir()                    # shares the root's name as a prefix
    return tmp_path, Roots.of("--output-root", [str(root)])


def test_paths_inside_a_root_resolve_to_their_real_path(tree, monkeypatch):
    tmp, roots = tree
    assert roots.confine(str(tmp / "output" / "runs" / "x"), "k") == str(tmp / "output" / "runs" / "x")
    assert roots.confine(str(tmp / "output" / "inner" / "y"), "k") == str(tmp / "output" / "runs" / "y")
    monkeypatch.chdir(tmp)   # relative paths are relative to the working directory
    assert roots.confine("output/runs/../runs/z", "k") == str(tmp / "output" / "runs" / "z")


@pytest.mark.parametrize("path", ["/etc/passwd", "{tmp}/output/../elsewhere/secret.txt", "{tmp}/output/escape/secret.txt",
                                  "{tmp}/output-evil/x", "{tmp}/output/escape"])
def test_paths_that_leave_the_roots_are_refused(tree, path):
    tmp, roots = tree
    with pytest.raises(PathOutsideRoot) as info:
        roots.confine(path.format(tmp=tmp), "runtime_args.output_dir")
    message = str(info.value)
    assert "runtime_args.output_dir" in message and str(tmp / "output") in message and "--output-root" in message
    assert "symlinks followed" in message
    assert "elsewhere" not in message and "SECRET" not in message and "passwd" not in message


def test_empty_path_is_refused(tree):
    with pytest.raises(InvalidArgument, match="runtime_args.resume_from must be a non-empty path"):
        tree[1].confine("", "runtime_args.resume_from")


def test_config_file_only_from_the_config_dir(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "ok.yaml").write_text("runtime_args: {}\n")
    (tmp_path / "secret.yaml").write_text("TOP-SECRET-CONTENT: 1\n")
    (configs / "link.yaml").symlink_to(tmp_path / "secret.yaml")
    monkeypatch.chdir(tmp_path)
    assert config_file("ok.yaml", "configs") == str(configs / "ok.yaml")
    assert config_file("configs/ok.yaml", "configs") == str(configs / "ok.yaml")   # as the README writes it
    for name in ("/etc/passwd", str(configs / "ok.yaml"), "../secret.yaml", "link.yaml", "../../../../etc/passwd"):
        with pytest.raises(PathOutsideRoot) as info:
            config_file(name, "configs")
        message = str(info.value)
        assert str(configs) in message and "--config-dir" in message and "absolute paths" in message, name
        assert "SECRET" not in message and "secret.yaml" not in message
    for name in ("configs/link.yaml", "configs/../secret.yaml"):   # from the working directory: refused alike
        with pytest.raises(InvalidArgument) as info:
            config_file(name, "configs")
        assert str(configs) in str(info.value) and "SECRET" not in str(info.value)
    with pytest.raises(InvalidArgument, match="names no file in the config dir"):
        config_file("missing.yaml", "configs")
    with pytest.raises(InvalidArgument, match="names no file"):
        config_file("secret.yaml", "configs")   # exists from the working directory, but outside the dir
    assert os.path.isfile(tmp_path / "secret.yaml")
