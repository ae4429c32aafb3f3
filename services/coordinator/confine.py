"""StartRun's view of the filesystem: the config a client names is read only from the config dir, and
every path of the run's config must resolve inside the coordinator's roots (docs/security.md). The
config then carries the resolved paths, so the coordinator and the services open exactly those."""
from __future__ import annotations

from dataclasses import dataclass

from rlgrid.v1 import coordinator_pb2 as cpb
from services.common.config import RLConfig, load_config
from services.common.paths import Roots, config_file, default_roots
from services.common.rpc import InvalidArgument

DEFAULT_CONFIG_DIR = "./configs"


@dataclass(frozen=True)
class RunRoots:
    """Where a run's paths may point: `--config-dir`, `--output-root`, `--data-root`, `--model-root`."""
    config_dir: str
    output: Roots
    data: Roots
    model: Roots

    @classmethod
    def defaults(cls) -> "RunRoots":
        return cls(DEFAULT_CONFIG_DIR, default_roots("--output-root"), default_roots("--data-root"),
                   default_roots("--model-root"))


def read_config(request: cpb.StartRunRequest, roots: RunRoots) -> RLConfig:
    """The run's config from config_yaml or a file of the config dir, plus overrides; the text is data."""
    if request.config_yaml and request.config_path:
        raise InvalidArgument("give config_yaml or config_path, not both")
    text, source = request.config_yaml or None, "config_yaml"
    if request.config_path:
        path, source = config_file(request.config_path, roots.config_dir), "config_path"
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            raise InvalidArgument("config_path could not be read as UTF-8 text") from None
    return load_config(text, list(request.overrides), source=source)


def confine_run(cfg: RLConfig, roots: RunRoots) -> None:
    """Replaces every path of `cfg` by its real path, or raises naming the key, the roots and the rule."""
    ra, policy, trainer = cfg.runtime_args, cfg.models.policy, cfg.models.policy_trainer
    ra.output_dir = roots.output.confine(ra.output_dir, "runtime_args.output_dir")
    if ra.resume_from:
        ra.resume_from = roots.output.confine(ra.resume_from, "runtime_args.resume_from")
    ra.data_path = roots.data.confine(ra.data_path, "runtime_args.data_path")
    if ra.eval_data_path:
        ra.eval_data_path = roots.data.confine(ra.eval_data_path, "runtime_args.eval_data_path")
    policy.load = roots.model.confine(policy.load, "models.policy.load")
    trainer.load = roots.model.confine(trainer.load, "models.policy_trainer.load")
