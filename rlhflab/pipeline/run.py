"""`rlhflab run`: the lab recipe's stages wired to their inputs, the run around them, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import yaml

from rlhflab.config import add_config_arguments, config_from_args, flat_dict, save_config, validate
from rlhflab.errors import InputError
from rlhflab.pipeline.config import (
    FIGURE1_BASELINE,
    PRESETS,
    RERUN_FREE,
    SIZES,
    RunConfig,
    _base,
    head_to_head,
)
from rlhflab.pipeline.schedule import Job, Scheduler
from rlhflab.stages.ppo.config import PPOConfig
from rlhflab.stages.pretrain import PretrainConfig
from rlhflab.stages.pretrain import train as pretrain
from rlhflab.training import check_resumable
from rlhflab.world import load_world


class Pipeline(Scheduler):
    """The lab recipe's stages (`jobs`) on the scheduler, and the run around them (`run`)."""

    def __init__(self, cfg: RunConfig):
        from rlhflab.device import choose_precision
        from rlhflab.training import resolve_device

        super().__init__(Path(cfg.out_dir), cfg.isolate_stages, cfg.jobs, resolve_device("auto"))
        self.cfg = cfg
        self.precision, self.precision_reason = cfg.precision, "asked for"
        if cfg.precision == "auto":
            choice = choose_precision(self.device)
            self.precision, self.precision_reason = choice.precision, choice.reason

    def _seeded(self, cfg):
        """A stage's config with the run's seed and, for a training stage, its precision."""
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=self.cfg.seed))
        if hasattr(cfg, "train"):
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=self.precision))
        return cfg

    # ------------------------------------------------------------------ the stages

    def jobs(self) -> list[Job]:
        """Every stage with what it reads, longest first among those that can run together."""
        root, world = self.root, self.root / "world"
        rm = root / "rm" / "model"
        out = [Job("world", lambda: self._world(world))]
        for size in ("large", "small"):  # the large one is the longer
            out.append(Job(f"pretrain-{size}", lambda s=size: self._pretrain(s, world), ("world",)))
        for size in ("large", "small"):
            out.append(Job(f"sft-{size}", lambda s=size: self._sft(s, world), (f"pretrain-{size}",)))
        sampled = tuple(f"sft-{s}" for s in SIZES if s in self.cfg.comparisons_from)
        out.append(Job("comparisons", lambda: self._comparisons(world), sampled))
        out.append(Job("rm", lambda: self._rm(world), (f"sft-{self.cfg.rm_base}", "comparisons")))
        sizes = [s for s in ("large", "small") if s in self.cfg.rlhf_sizes]  # the large runs first: the longer
        if self.cfg.rl_init == "c3":
            for size in sizes:
                out.append(
                    Job(f"rlinit-{size}", lambda s=size: self._rl_init(s, world, rm), (f"pretrain-{size}", "rm"))
                )
        for size in sizes:
            out += self._rl_jobs(size, world, rm)
        sweeps = [(f"sweep/ptx-beta-{b:g}", self.cfg.ppo_ptx, b, True) for b in self.cfg.sweep_ptx_betas]
        sweeps += [(f"sweep/beta-{b:g}", self.cfg.ppo, b, False) for b in self.cfg.sweep_betas]
        for name, base, beta, ptx in sweeps:  # PPO-ptx first: the longer
            cfg = dataclasses.replace(base, kl_coef=beta)
            make = lambda n=name, c=cfg, p=ptx: self._ppo(n, c, world, rm, p)
            out.append(Job(name, make, ("rm", self._rl_start_stage("small"))))
        out.append(Job("rm-eval", lambda: self._rm_eval(world), ("rm", "comparisons")))
        out += self._answer_jobs(world, rm)
        out.append(Job("eval", lambda: self._evaluate(world, rm), tuple(j.name for j in out)))
        return out

    def _answer_jobs(self, world: Path, rm: Path) -> list[Job]:
        """Each evaluated model answers the eval's prompts once its stage is done, beside the
        stages still running (eval.answering.answer_stage; the eval takes the results from
        `answers/`). Each waits for the RM too (a prompted model's prefix is the RM's pick),
        so that the RM, on the critical path, keeps every core: beside an answer job it would
        get one thread (RM 181 s against 120 s on two threads, 2-core EPYC). The large and
        prompted ones first: the longer."""
        from rlhflab.eval.answering import answer_stage

        cfg = self._eval_config(world, rm)
        paths = {**cfg.models, **cfg.capability_models}
        names = sorted(paths, key=lambda n: (not n.endswith("-large"), n not in cfg.prompted))
        out = []
        for name in names:
            stage = Path(paths[name]).parent.relative_to(self.root).as_posix()
            make = lambda n=name: (answer_stage, (cfg, n, str(self.root / "answers" / n)))  # eval's cfg, unchecked
            out.append(Job(f"answers/{name}", make, (stage, "rm")))
        return out

    def _rl_jobs(self, size: str, world: Path, rm: Path) -> list[Job]:
        """PPO-ptx and PPO (the longer first) from the SFT model of `size`, with the one RM."""
        out = []
        for kind, cfg, ptx in (("ppoptx", self.cfg.ppo_ptx, True), ("ppo", self.cfg.ppo, False)):
            name = f"{kind}-{size}"
            make = lambda n=name, c=cfg, p=ptx: self._ppo(n, c, world, rm, p, size)
            out.append(Job(name, make, ("rm", self._rl_start_stage(size))))
        return out

    def _rl_start_stage(self, size: str) -> str:
        """The stage whose model PPO of `size` starts from and is anchored to (`rl_init`)."""
        return f"rlinit-{size}" if self.cfg.rl_init == "c3" else f"sft-{size}"

    def rl_start(self, size: str) -> Path:
        """The model PPO of `size` starts from and is anchored to."""
        return self.root / self._rl_start_stage(size) / "model"

    def models(self) -> dict[str, Path]:
        """The evaluated models by name (the paper's GPT, SFT, PPO, PPO-ptx)."""
        models = {f"GPT-{s}": self.root / f"pretrain-{s}" / "model" for s in SIZES}
        models.update({f"SFT-{s}": self.root / f"sft-{s}" / "model" for s in SIZES})
        for s in SIZES:
            if s in self.cfg.rlhf_sizes:
                models[f"PPO-{s}"] = self.root / f"ppo-{s}" / "policy"
                models[f"PPO-ptx-{s}"] = self.root / f"ppoptx-{s}" / "policy"
        for name, stage in self._sweep_models(full=True).items():
            models[name] = self.root / stage / "policy"
        return models

    def head_to_head(self) -> list[tuple[str, str]]:
        """The eval's head-to-head pairs: `config.head_to_head`'s, and the fully evaluated β
        sweep models against SFT-small, where they start."""
        return head_to_head(self.cfg.rlhf_sizes) + [(m, "SFT-small") for m in self._sweep_models(full=True)]

    def _sweep_models(self, full: bool) -> dict[str, str]:
        """The β sweeps' models by name -> stage: evaluated in full (`full`; PPO-ptx at every β
        of `sweep_ptx_betas` and PPO at those βs), or for capability only (PPO at the others)."""
        ptx = set(self.cfg.sweep_ptx_betas)
        out = {f"PPO-ptx-beta{b:g}-small": f"sweep/ptx-beta-{b:g}" for b in self.cfg.sweep_ptx_betas} if full else {}
        out.update({f"PPO-beta{b:g}-small": f"sweep/beta-{b:g}" for b in self.cfg.sweep_betas if (b in ptx) == full})
        return out

    def _world(self, path: Path):
        from rlhflab.world.build import build

        return build, (path, self.cfg.seed, self.cfg.scale)

    def _pretrain(self, size: str, world: Path):
        base: PretrainConfig = getattr(self.cfg, f"pretrain_{size}")
        cfg = dataclasses.replace(base, world=str(world), out_dir=str(self.root / f"pretrain-{size}"), size=size)
        return pretrain, (self._seeded(cfg),)

    def _sft(self, size: str, world: Path, stage: str = "sft", **more):
        """SFT of `size` from its base on the demonstrations (`more`: other SFTConfig fields)."""
        from rlhflab.stages.sft import train

        cfg = dataclasses.replace(
            getattr(self.cfg, f"sft_{size}"),
            base=str(self.root / f"pretrain-{size}" / "model"),
            data=str(world / "sft_train.jsonl"),
            val_data=str(world / "sft_val.jsonl"),
            out_dir=str(self.root / f"{stage}-{size}"),
            **more,
        )
        return train, (self._seeded(cfg),)

    def _rl_init(self, size: str, world: Path, rm: Path):
        """App. C.3's model: the SFT recipe of `size`, `rl_init_epochs` long, with pretraining
        text mixed in, its epoch chosen by the reward model."""
        return self._sft(
            size,
            world,
            "rlinit",
            epochs=self.cfg.rl_init_epochs,
            ptx_data=str(world / "corpus_train.jsonl"),
            ptx_fraction=self.cfg.rl_init_ptx_fraction,
            reward_model=str(rm),
            val_prompts=str(world / "ppo_val.jsonl"),
        )

    def _comparisons(self, world: Path):
        from rlhflab.stages.comparisons import build

        out, sft = self.root / "comparisons", lambda s: self.root / f"sft-{s}" / "model"
        also = tuple(sft(s) for s in SIZES if s in self.cfg.comparisons_from and s != "small")
        return build, (world, sft("small"), out, self.cfg.comparisons, self.cfg.seed, also)

    def _rm(self, world: Path):
        from rlhflab.stages.rm import train

        comparisons = self.root / "comparisons"
        cfg = dataclasses.replace(
            self.cfg.rm,
            base=str(self.root / f"sft-{self.cfg.rm_base}" / "model"),
            rankings=str(comparisons / "train.jsonl"),
            val_rankings=str(comparisons / "val.jsonl"),
            demos=str(world / "sft_train.jsonl"),
            # SFT-small's samples on the RM's validation prompts (the default's one PPO start; the
            # large size's PPO sees the same RM scale), on prompts the RM did not train on
            policy_samples=str(comparisons / "val_samples.jsonl"),
            out_dir=str(self.root / "rm"),
        )
        return train, (self._seeded(cfg),)

    def _rm_eval(self, world: Path):
        from rlhflab.eval.rm_report import rm_report

        c = self.root / "comparisons"
        return rm_report, (
            world,
            self.root / "rm" / "model",
            self.root / "rm-eval",
            c / "val.jsonl",
            c / "heldout.jsonl",
        )

    def _ppo(self, name: str, base: PPOConfig, world: Path, rm: Path, ptx: bool, size: str = "small"):
        from rlhflab.stages.ppo import train

        cfg = dataclasses.replace(
            base,
            policy=str(self.rl_start(size)),
            reward_model=str(rm),
            prompts=str(world / "ppo_train.jsonl"),
            val_prompts=str(world / "ppo_val.jsonl"),
            ptx_data=str(world / "corpus_train.jsonl") if ptx else None,
            world=str(world),
            out_dir=str(self.root / name),
        )
        return train, (self._seeded(cfg),)

    def _evaluate(self, world: Path, rm: Path):
        from rlhflab.eval.evaluate import evaluate

        cfg = self._eval_config(world, rm)
        validate(cfg)  # here, when the stage starts: its rl_runs exist by then
        return evaluate, (cfg,)

    def _eval_config(self, world: Path, rm: Path):
        """The eval's config (its answer jobs' too): every model's answers in `answers/`."""
        models = self.models()
        runs = [f"{r}-{s}" for s in SIZES if s in self.cfg.rlhf_sizes for r in ("ppo", "ppoptx")]
        runs += [f"sweep/beta-{b:g}" for b in self.cfg.sweep_betas]
        runs += [f"sweep/ptx-beta-{b:g}" for b in self.cfg.sweep_ptx_betas]
        rl_runs = {name.removeprefix("sweep/"): str(self.root / name / "metrics.jsonl") for name in runs}
        capability_only = {name: str(self.root / stage / "policy") for name, stage in self._sweep_models(False).items()}
        if self.cfg.rl_init == "c3":
            capability_only.update({f"RL-init-{s}": str(self.rl_start(s)) for s in self.cfg.rlhf_sizes})
        cfg = dataclasses.replace(
            self.cfg.eval,
            world=str(world),
            models={k: str(v) for k, v in models.items()},
            rl_runs=rl_runs,
            capability_models=capability_only,
            prompted=[m for m in models if m.startswith("GPT-")],
            baseline=FIGURE1_BASELINE,
            head_to_head=[f"{a}:{b}" for a, b in self.head_to_head()],
            reward_model=str(rm),
            answers_from=str(self.root / "answers"),
            out_dir=str(self.root / "eval"),
        )
        return self._seeded(cfg)

    def run(self) -> dict:
        self._check_resumable()
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.root / "config.yaml")
        print(f"[run] precision: {self.precision} ({self.precision_reason})", flush=True)
        lanes = self.lanes()
        if lanes > 1:
            print(f"[run] up to {lanes} stages side by side (jobs)", flush=True)
        t0 = time.time()
        self.schedule(self.jobs(), lanes)
        from rlhflab.report.sections import write_report
        from rlhflab.report.walkthrough import write_walkthrough

        world, rm = self.root / "world", self.root / "rm" / "model"
        write_walkthrough(self.root, world, rm, self.root / "ppo-small", self.rl_start("small"))
        write_report(self.root, self.root / "report.html")
        results = {f"pretrain_{s}": self._summary(f"pretrain-{s}") for s in SIZES}
        results["eval"] = self._summary("eval")
        results["timings"] = {**self.timings, "total": round(time.time() - t0, 1)}
        return results

    def _check_resumable(self) -> None:
        """A run directory holds one run: finished stages of another config or of an older
        world are refused here, before any stage starts, rather than reused."""
        world = self.root / "world"
        if (world / "summary.json").is_file():
            try:
                load_world(world)
            except InputError as e:  # its later stages are stale too: rebuilding the world is no cure
                msg = f"a lab world of another version: {self.root} was made by another rlhflab; use a new --out_dir"
                raise InputError(msg, file=e.file, field=e.field) from None
        saved = self.root / "config.yaml"
        if not saved.is_file():
            return
        old = flat_dict(yaml.safe_load(saved.read_text()) or {})
        new = flat_dict(yaml.safe_load(yaml.safe_dump(dataclasses.asdict(self.cfg))))  # lists as YAML has them
        remedy = "its finished stages would be reused: use a new --out_dir, or delete config.yaml and stages to redo"
        check_resumable(old, new, str(saved), ignore=RERUN_FREE, what="run", remedy=remedy)

    def _summary(self, name: str) -> dict:
        return json.loads((self.root / name / "summary.json").read_text())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, RunConfig)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="'default': the full lab run; 'figure1': the default plus PPO and PPO-ptx at the large size "
        "(Figure 1's every point), the RM's comparisons ranked on both SFT models' samples; 'quick': the "
        "default halved on its critical path (large model pretrained 300 steps, RM 1 epoch, PPO 2,048 "
        "episodes, β sweep at 0 only), for CPUs without bf16: it gives up the large model's lead over the small "
        "one; 'smoke': a one-minute check",
    )


def run_cli(args) -> int:
    cfg = config_from_args(RunConfig, args, base=_base(args.preset))
    results = Pipeline(cfg).run()
    ev = results["eval"]
    print(f"model              gold   unseen  win vs {FIGURE1_BASELINE} (held-out labelers)   capability")
    for name in sorted(k.split("/", 1)[1] for k in ev if k.startswith("gold/")):
        win = (
            f"{ev[f'winrate/{name}']:.2f} [{ev[f'winrate_ci_low/{name}']:.2f}, {ev[f'winrate_ci_high/{name}']:.2f}]"
            if f"winrate/{name}" in ev
            else ""
        )
        cap = ev.get(f"capability/mean/{name}", float("nan"))
        unseen = ev.get(f"gold_unseen/{name}", float("nan"))
        print(f"  {name:<18} {ev[f'gold/{name}']:.3f}  {unseen:.3f}   {win:<36} {cap:.3f}")
    for a, b in head_to_head(cfg.rlhf_sizes):
        key = f"{a}/{b}"
        print(
            f"{a} preferred to {b}: {ev[f'h2h/{key}']:.2f} "
            f"[{ev[f'h2h_ci_low/{key}']:.2f}, {ev[f'h2h_ci_high/{key}']:.2f}] (held-out labelers)"
            + (
                f"; unseen prompts {ev[f'h2h_unseen/{key}']:.2f} "
                f"[{ev[f'h2h_unseen_ci_low/{key}']:.2f}, {ev[f'h2h_unseen_ci_high/{key}']:.2f}]"
                if f"h2h_unseen/{key}" in ev
                else ""
            )
        )
    print(f"report: {Path(cfg.out_dir) / 'report.html'}")
    return 0
