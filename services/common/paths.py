"""Where a client may point a server: every path a request names must resolve inside a root the
server was started with (`--config-dir`, `--output-root`, `--data-root`, `--model-root`).

A path is resolved the way the server would open it: relative to the server's working directory,
`..` applied and every symlink followed (os.path.realpath), and only then compared with the roots,
whose own symlinks are resolved the same way. The resolved path is what the server uses afterwards.
Errors name the key, the roots and the rule, never the path's target or a file's content.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

from services.common.rpc import InvalidArgument

RULE = "it must resolve (relative to the working directory, '..' applied, symlinks followed) inside"


class PathOutsideRoot(InvalidArgument):
    """A path a request names resolves outside every root of its kind."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


@dataclass(frozen=True)
class Roots:
    """The directories one kind of path may resolve into, and the flag that sets them."""
    flag: str                 # e.g. "--output-root": named in every error
    dirs: tuple[str, ...]     # real paths

    @classmethod
    def of(cls, flag: str, dirs: Iterable[str]) -> "Roots":
        return cls(flag, tuple(dict.fromkeys(_real(d) for d in dirs)))

    def __str__(self) -> str:
        return f"{', '.join(self.dirs)} ({self.flag})"

    def contains(self, real: str) -> bool:
        return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in self.dirs)

    def confine(self, path: str, key: str) -> str:
        """The real path of `path` when it lies inside a root; else PathOutsideRoot naming `key`."""
        if not path or "\0" in path:
            raise InvalidArgument(f"{key} must be a non-empty path inside {self}")
        real = _real(path)
        if not self.contains(real):
            raise PathOutsideRoot(f"{key} is outside the allowed roots: {RULE} {self}")
        return real


def config_file(name: str, config_dir: str) -> str:
    """The real path of the config file `name` names inside `config_dir` (`--config-dir`).

    `name` is relative: to the config dir (`demo_cpu.yaml`) or, as the README writes it, to the
    working directory (`configs/demo_cpu.yaml`). Absolute paths are refused, and so is any name
    that resolves outside the config dir (through `..` or a symlink)."""
    root = Roots.of("--config-dir", [config_dir])
    rule = (f"config_path must name a YAML file inside the config dir {root}, relative to it or to the "
            f"coordinator's working directory; absolute paths, '..' that leaves the dir and symlinks that "
            f"point out of it are refused (send the YAML itself as config_yaml instead)")
    if not name or "\0" in name or os.path.isabs(name):
        raise PathOutsideRoot(rule)
    real = _real(os.path.join(root.dirs[0], name))
    if not root.contains(real):
        raise PathOutsideRoot(rule)
    if os.path.isfile(real):
        return real
    from_cwd = _real(name)   # the same message whether or not it exists: no probing outside the dir
    if root.contains(from_cwd) and os.path.isfile(from_cwd):
        return from_cwd
    raise InvalidArgument(f"config_path names no file in the config dir {root}")


# ---- command line --------------------------------------------------------------------------------
ROOT_FLAGS = {   # flag -> (defaults, what may be under it)
    "--output-root": (["./output"], "runs, checkpoints and HF exports are written (output_dir, resume_from, "
                                    "the trainer's checkpoint paths)"),
    "--data-root": (["./data", "./output"], "prompt files are read (runtime_args.data_path, eval_data_path)"),
    "--model-root": (["./models", "./output"], "model directories are loaded (models.policy.load, "
                                               "models.policy_trainer.load)"),
}


def add_root_args(parser, *flags: str) -> None:
    """Adds repeatable root flags (each defaulting to ROOT_FLAGS's dirs, relative to the working directory)."""
    for flag in flags:
        defaults, what = ROOT_FLAGS[flag]
        parser.add_argument(flag, action="append", metavar="DIR",
                            help=f"a directory where {what}; repeat for several (default: {' and '.join(defaults)})")


def roots_from_args(args, flag: str) -> Roots:
    given = getattr(args, flag.lstrip("-").replace("-", "_"))
    return Roots.of(flag, given or ROOT_FLAGS[flag][0])


def default_roots(flag: str) -> Roots:
    return Roots.of(flag, ROOT_FLAGS[flag][0])
