"""The ``stamina`` command line. Composition only: every subcommand calls components / core functions.

    stamina stack up|down|status|env        the embedded local stack (SeaweedFS, MLflow, Ray head)
    stamina run-local                       what `make run` does: stack up + a built-in tiny sequence via ray job submit
    stamina submit --config FILE            ray job submit of a sequence to the running stack
    stamina pretrain-tiny                   pretrain (or reuse) the tiny base model
    stamina bench continual --method M      the continual benchmark (RESULTS.md)
    stamina export --sequence ID --out DIR  a full diffusers folder of a folded step
    stamina lineage --sequence ID           the chain HEAD -> base, S3 and MLflow cross-checked
    stamina branch --sequence ID --step K --new-id NEW
"""

from __future__ import annotations

import argparse
import os
import sys

from stamina_core.errors import StaminaError


def _stack_cfg(args):
    from infra.local.stack import StackConfig

    return StackConfig(state_dir=args.state_dir) if getattr(args, "state_dir", None) else StackConfig()


def cmd_stack(args) -> int:
    from infra.local import stack

    cfg = _stack_cfg(args)
    if args.action == "up":
        info = stack.up(cfg)
        print(f"S3      {info.s3_endpoint}  (bucket {info.bucket})")
        print(f"MLflow  {info.mlflow_uri}")
        print(f"Ray     {info.ray_address}  dashboard {info.dashboard_url}")
    elif args.action == "down":
        stack.down(cfg)
        print("stack stopped")
    elif args.action == "status":
        for name, st in stack.status(cfg).items():
            print(f"{name:7s} {st}")
    elif args.action == "env":
        info = stack.load_info(cfg.state_dir)
        for k, v in sorted(info.env().items()):
            print(f"export {k}={v}")
    return 0


def cmd_run_local(args) -> int:
    from pipelines.local_run import run_local

    return run_local(concepts=args.concepts, steps=args.steps, keep_stack=not args.stop_stack)


def cmd_submit(args) -> int:
    from pipelines.local_run import submit

    return submit(args.config, wait=not args.no_wait)


def cmd_pretrain(args) -> int:
    from stamina_core.paths import default_pretrained_dir
    from stamina_core.pretrain import cli_config, pretrain_tiny

    try:
        cfg = cli_config(args.test_config, args.steps, args.seed, args.threads, snr_gamma=args.snr_gamma,
                         legacy=args.legacy, pair_fraction=args.pair_fraction,
                         pair_kinds=args.pair_kinds)
    except ValueError as e:  # --test-config with --legacy (config errors are ConfigError, handled by main)
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = pretrain_tiny(cfg, cache_dir=args.cache_dir or default_pretrained_dir(), progress=True)
    print(path)
    return 0


def cmd_bench(args) -> int:
    if args.which == "continual":
        import importlib.util
        from pathlib import Path

        path = Path(__file__).resolve().parents[1] / "bench" / "continual.py"
        spec = importlib.util.spec_from_file_location("stamina_bench_continual", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        bench_main = mod.main
        argv = ["--method", args.method, "--concepts", str(args.concepts), "--seeds", args.seeds]
        if args.steps:
            argv += ["--steps", str(args.steps)]
        return bench_main(argv)
    raise SystemExit(f"unknown benchmark {args.which!r}")


def cmd_export(args) -> int:
    from pipelines.sequence import export_model

    out = export_model(args.sequence, args.out, step=args.step, storage_uri=args.storage)
    print(out)
    return 0


def cmd_lineage(args) -> int:
    from pipelines.sequence import show_lineage

    return show_lineage(args.sequence, storage_uri=args.storage, model_name=args.model)


def cmd_branch(args) -> int:
    from pipelines.sequence import branch_sequence

    print(branch_sequence(args.sequence, args.step, args.new_id, storage_uri=args.storage))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stamina", description="STAMINA continual diffusion pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("stack", help="embedded local stack")
    s.add_argument("action", choices=["up", "down", "status", "env"])
    s.add_argument("--state-dir", default=None, help="stack state folder (default .stamina/stack)")
    s.set_defaults(func=cmd_stack)

    s = sub.add_parser("run-local", help="stack up + the built-in tiny sequence via ray job submit (make run)")
    s.add_argument("--concepts", type=int, default=3, help="number of built-in concepts (default 3)")
    s.add_argument("--steps", type=int, default=None, help="training steps per concept (default from the config)")
    s.add_argument("--stop-stack", action="store_true", help="stop the stack at the end (default: keep it for the UI)")
    s.set_defaults(func=cmd_run_local)

    s = sub.add_parser("submit", help="ray job submit a sequence config to the running stack")
    s.add_argument("--config", required=True)
    s.add_argument("--no-wait", action="store_true")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("pretrain-tiny", help="pretrain (or reuse) the tiny base model")
    s.add_argument("--cache-dir", default=None, help="default: $STAMINA_CACHE/pretrained or ~/.cache/stamina/pretrained")
    s.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2400; another count is another base)")
    s.add_argument("--legacy", action="store_true",
                   help="the pre-session-10 base tiny-f4f0e6d5b69f every table before session 10 ran on "
                        "(UNet 32,64,64, plain MSE, 1 thread; about 20 min)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads while training (default 2; another count is another base)")
    s.add_argument("--snr-gamma", type=float, default=None,
                   help="Min-SNR loss weighting (default 5; another value is another base; RESULTS.md 'Base recipes')")
    s.add_argument("--pair-fraction", type=float, default=None,
                   help="share of two-object images captioned 'a photo of a A and a B' (default 0; another value is "
                        "another base; RESULTS.md 'Multi-concept prompts')")
    s.add_argument("--pair-kinds", default=None, help="with --pair-fraction: pair only these kinds (animal, glyph)")
    s.add_argument("--test-config", action="store_true", help="the seconds-long test configuration")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("bench", help="benchmarks")
    s.add_argument("which", choices=["continual"])
    s.add_argument("--method", default="stamina")
    s.add_argument("--concepts", type=int, default=50)
    s.add_argument("--seeds", default="0")
    s.add_argument("--steps", type=int, default=None)
    s.set_defaults(func=cmd_bench)

    for name, fn, hlp in (("export", cmd_export, "full diffusers folder of a folded step"),
                          ("lineage", cmd_lineage, "chain HEAD -> base, S3 and MLflow cross-checked")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--sequence", required=True)
        s.add_argument("--storage", default=None, help="s3://bucket/prefix (default: from the stack / s3://stamina/runs)")
        if name == "export":
            s.add_argument("--step", type=int, default=None, help="step index (default HEAD)")
            s.add_argument("--out", required=True)
        else:
            s.add_argument("--model", default=None, help="registered model name (default stamina-SEQUENCE)")
        s.set_defaults(func=fn)

    s = sub.add_parser("branch", help="branch a sequence from a committed step (no data copied)")
    s.add_argument("--sequence", required=True)
    s.add_argument("--step", type=int, required=True)
    s.add_argument("--new-id", required=True)
    s.add_argument("--storage", default=None)
    s.set_defaults(func=cmd_branch)
    return p


def _stack_env_defaults() -> None:
    """Point clients at the running local stack unless the environment already says otherwise."""
    try:
        from infra.local.stack import load_info

        info = load_info()
    except Exception:  # no local stack recorded: the environment must carry the endpoints
        return
    for k, v in info.env().items():
        os.environ.setdefault(k, v)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if args.cmd in ("export", "lineage", "branch", "submit"):
        _stack_env_defaults()
    try:
        return int(args.func(args) or 0)
    except StaminaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
