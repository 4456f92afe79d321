"""Wrong implementations the test suite must catch: a catalogue of mutants, and a runner.

Each entry is (file, exact text, replacement, the tests that must then fail). ``python tools/mutants.py`` applies each
mutant alone, runs its tests (one thread), restores the file, and lists the survivors; ``--list`` shows the
catalogue, ``--only 3,7`` runs some (indices from --list), ``--stale`` only checks that every text still occurs once.

The catalogue grew out of hand mutation reviews (session 6): every mutant here survived the suite once, until a test
was written for it, or was caught from the start and guards a subtle spot (a sign, a factor, an order). When code
changes so that a text no longer occurs, the runner says so: update the entry with the code, do not drop it. Not
part of the test run (about 15 minutes on one core); run it after changing maths or the tests that guard it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# fmt: off
MUTANTS: list[tuple[str, str, str, str]] = [
    ('src/aotdiff/diffusion.py', 'extra = (labels, augment_labels)', 'extra = (labels, None)', 'tests/test_diffusion.py'),
    ('src/aotdiff/diffusion.py', 'extra = (labels,)', 'extra = ()', 'tests/test_diffusion.py tests/test_nets.py'),
    ('src/aotdiff/diffusion.py', 'sigma = sigma.reshape(1).expand(images.shape[0])', 'sigma = sigma.reshape(1)', 'tests/test_diffusion.py'),
    ('src/aotdiff/diffusion.py', 'loss_weight(sigma, getattr(denoiser, "sigma_data", SIGMA_DATA))', 'loss_weight(sigma, SIGMA_DATA)', 'tests/test_diffusion.py'),
    ('src/aotdiff/diffusion.py', 'w = torch.softmax(-d2 / (2 * sigma_t**2), dim=1)', 'w = torch.softmax(-d2 / (sigma_t**2), dim=1)', 'tests/test_diffusion.py'),
    ('src/aotdiff/sampling.py', 'gamma = min(churn / num_steps, math.sqrt(2.0) - 1.0) if churn > 0 and s_min <= t_cur <= s_max else 0.0', 'gamma = min(churn / num_steps, math.sqrt(2.0)) if churn > 0 and s_min <= t_cur <= s_max else 0.0', 'tests/test_sampling.py'),
    ('src/aotdiff/sampling.py', 'gamma = min(churn / num_steps, math.sqrt(2.0) - 1.0) if churn > 0 and s_min <= t_cur <= s_max else 0.0', 'gamma = min(churn / num_steps, math.sqrt(2.0) - 1.0) if churn > 0 and s_min <= t_next <= s_max else 0.0', 'tests/test_sampling.py'),
    ('src/aotdiff/sampling.py', 'x_hat = x_cur + math.sqrt(float(t_hat) ** 2 - t_cur**2) * s_noise * eps.to(torch.float64)', 'x_hat = x_cur + (float(t_hat) - t_cur) * s_noise * eps.to(torch.float64)', 'tests/test_sampling.py'),
    ('src/aotdiff/sampling.py', 'x_hat = x_cur + math.sqrt(float(t_hat) ** 2 - t_cur**2) * s_noise * eps.to(torch.float64)', 'x_hat = x_cur + math.sqrt(float(t_hat) ** 2 - t_cur**2) * eps.to(torch.float64)', 'tests/test_sampling.py'),
    ('src/aotdiff/sampling.py', 'g_boost = min(boost_churn / num_steps, math.sqrt(2.0) - 1.0)', 'g_boost = min(boost_churn, math.sqrt(2.0) - 1.0)', 'tests/test_sampling.py'),
    ('src/aotdiff/sampling.py', 'return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)', 'return (images * 127.5 + 127.5).clip(0, 255).to(torch.uint8)', 'tests/test_sampling.py'),
    ('src/aotdiff/guidance/guide.py', 'if self.boost and self._step % self.double_period == 0 and', 'if self.boost and self._step % self.double_period != 0 and', 'tests/test_guidance.py'),
    ('src/aotdiff/guidance/guide.py', 'ratio = logit.clamp(-self.max_logit, self.max_logit)', 'ratio = logit', 'tests/test_guidance.py'),
    ('src/aotdiff/coupling/couplers.py', 'independent_sum += float(np.trace(c))', 'independent_sum += float(np.trace(target))', 'tests/test_aot_variants.py'),
    ('src/aotdiff/coupling/couplers.py', 'return c - scale * rng.gumbel(size=c.shape)', 'return c + scale * rng.gumbel(size=c.shape)', 'tests/test_aot_variants.py'),
    ('src/aotdiff/coupling/stream.py', 'augment_labels=None if pool.augment_labels is None else self._rows(pool.augment_labels, step),', 'augment_labels=None if pool.augment_labels is None else self._rows(pool.augment_labels, step).flip(0),', 'tests/test_coupling.py'),
    ('src/aotdiff/train/checkpoint.py', '"ema.safetensors": _weights_bytes(ema, metadata)', '"ema.safetensors": _weights_bytes(model, metadata)', 'tests/test_rundir.py'),
    ('src/aotdiff/train/checkpoint.py', 'name = "ema.safetensors" if ema else "model.safetensors"', 'name = "model.safetensors" if ema else "ema.safetensors"', 'tests/test_rundir.py'),
    ('src/aotdiff/train/checkpoint.py', 'sigma_data = float(meta.get("sigma_data", "0.5"))', 'sigma_data = 0.5', 'tests/test_rundir.py'),
    ('src/aotdiff/data/augment.py', 'inverse = inverse @ _rotation(-r) @ _scaling(1 / stretch, stretch) @ _rotation(r)', 'inverse = inverse @ _rotation(r) @ _scaling(1 / stretch, stretch) @ _rotation(-r)', 'tests/test_augment.py'),
    ('src/aotdiff/train/loop.py', '        pools, wait_ms = [last], 0.0\n', '        return {}\n', 'tests/test_cli.py -k conditional_aot'),
    ('src/aotdiff/guidance/adm.py', 'h = self.out_layers[0](h) * (1 + scale) + shift', 'h = self.out_layers[0](h) * (1 + shift) + scale', 'tests/test_adm.py'),
    ('src/aotdiff/guidance/adm.py', 'h = self.in_layers[-1](self.h_upd(h))', 'h = self.h_upd(self.in_layers[-1](h))', 'tests/test_adm.py'),
    ('src/aotdiff/guidance/adm.py', 'return x[:, :, 0]', 'return x[:, :, 1]', 'tests/test_adm.py'),
    ('src/aotdiff/guidance/adm.py', 'x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)', 'x = torch.cat([x.mean(dim=-1, keepdim=True) * 0, x], dim=-1)', 'tests/test_adm.py'),
    ('src/aotdiff/metrics/inception.py', 'return 2.0 * x - 1.0', 'return x', 'tests/test_inception.py'),
    ('src/aotdiff/metrics/inception.py', 'padding=1, count_include_pad=False', 'padding=1, count_include_pad=True', 'tests/test_inception.py'),
    ('src/aotdiff/metrics/inception.py', 'pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)', 'pooled = _avg_pool_same(x)', 'tests/test_inception.py'),
    ('src/aotdiff/metrics/inception.py', '        return type(name, (_Inert,), {"pickle_global": f"{module}.{name}"})', '        return super().find_class(module, name)', 'tests/test_inception.py'),
    ('src/aotdiff/metrics/fid.py', '        f = vectors[:, keep] * np.sqrt(values[keep])', '        f = vectors[:, keep] * values[keep]', 'tests/test_frechet.py tests/test_fid.py'),
    ('src/aotdiff/metrics/fid.py', 'sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)', 'sigma = (self.outer - self.count * np.outer(mu, mu)) / self.count', 'tests/test_fid.py tests/test_frechet.py'),
    ('src/aotdiff/metrics/fid.py', 'd.kthvalue(k + 1, dim=1)', 'd.kthvalue(k, dim=1)', 'tests/test_fid.py'),
    ('src/aotdiff/interop/edm_pickle.py', 'if tensor is None or (group == "_buffers" and name in non_persistent):', 'if tensor is None:', 'tests/test_interop.py'),
    ('src/aotdiff/coupling/solvers.py', '        col[rows] = cols', '        col[cols] = rows', 'tests/test_coupling.py'),
    ('src/aotdiff/data/toy2d.py', 'log_component = -sq / (2 * self.std**2) - math.log(2 * math.pi * self.std**2)', 'log_component = -sq / (2 * self.std**2) - 0.5 * math.log(2 * math.pi * self.std**2)', 'tests/test_data.py'),
    ('src/aotdiff/data/toy2d.py', 'dark = inside & ((ij[:, 0] + ij[:, 1]) % 2 == 0)', 'dark = inside & ((ij[:, 0] + ij[:, 1]) % 2 == 1)', 'tests/test_data.py'),
    ('src/aotdiff/data/toy2d.py', 'generator = torch.Generator().manual_seed(seed)\n    points', 'generator = torch.Generator().manual_seed(0)\n    points', 'tests/test_data.py'),
    ('src/aotdiff/data/mnist5k.py', 'images = values.astype(np.uint8).reshape(MNIST5K_COUNT, 1, MNIST5K_RESOLUTION, MNIST5K_RESOLUTION)', 'images = values.astype(np.uint8).reshape(MNIST5K_COUNT, 1, MNIST5K_RESOLUTION, MNIST5K_RESOLUTION).transpose(0, 1, 3, 2).copy()', 'tests/test_mnist5k.py'),
    ('src/aotdiff/train/runloop.py', 'self._writer = open_tensorboard(run_dir, purge_step=self.nimg + 1)', 'self._writer = open_tensorboard(run_dir, purge_step=self.nimg)', 'tests/test_rundir.py'),
    ('src/aotdiff/train/runloop.py', 'self.nimg, self.steps, self.elapsed = int(st["nimg"]), int(st["step"]), float(st["elapsed_s"])', 'self.nimg, self.steps, self.elapsed = int(st["nimg"]), int(st["step"]) + 1, float(st["elapsed_s"])', 'tests/test_rundir.py'),
    ('src/aotdiff/train/distributed.py', '        value /= info.world_size', '        pass', 'tests/test_train_ddp.py'),
    ('src/aotdiff/bench.py', 'img, img_bare = cfg.batch * n_steps / t_trainer, bare.batch * bare.accum * n_steps / t_bare', 'img, img_bare = cfg.batch * n_steps / t_trainer, bare.batch * n_steps / t_bare', 'tests/test_eval_cli.py tests/test_benchmarks.py'),
    ('src/aotdiff/metrics/quality.py', 'generator = torch.Generator().manual_seed(seed)\n    return get_toy', 'generator = torch.Generator().manual_seed(0)\n    return get_toy', 'tests/test_eval_cli.py tests/test_sweep.py'),
    ('src/aotdiff/cpu.py', 'idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)', 'idle = fields[3]', 'tests/test_cpu.py'),
    ('src/aotdiff/cpu.py', 'return max(1, min(cores, math.ceil(cores - load - 0.25)))', 'return max(1, min(cores, math.ceil(cores - load)))', 'tests/test_cpu.py'),
    ('src/aotdiff/report.py', 'groups.setdefault((r.run, r.metric, r.solver, r.rho, r.dg_weight), {})[r.nfe] = r', 'groups.setdefault((r.run, r.metric, r.solver, r.rho, 0.0), {})[r.nfe] = r', 'tests/test_sweep.py tests/test_eval_cli.py'),
    ('src/aotdiff/metrics/fid.py', 'values[s] = within - 2 * kxy.mean()', 'values[s] = within - kxy.mean()', 'tests/test_fid.py'),
    ('src/aotdiff/metrics/inception.py', 'x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)', 'x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=True)', 'tests/test_inception.py'),
    ('src/aotdiff/metrics/inception.py', 'self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)', 'self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3)', 'tests/test_inception.py'),
    ('src/aotdiff/coupling/solvers.py', 'weights = cost[rows, cols] - cost.min() + 1.0', 'weights = cost[rows, cols] - cost.min()', 'tests/test_coupling.py'),
    ('src/aotdiff/train/distributed.py', 'index = int(m.group(1)) if m.group(1) is not None else local_rank', 'index = int(m.group(1)) if m.group(1) is not None else 0', 'tests/test_eval_cli.py tests/test_train_ddp.py'),
    ('src/aotdiff/generate.py', 'seeds.extend(range(lo, hi + 1))', 'seeds.extend(range(lo, hi))', 'tests/test_sampling.py -k seeds_are_parsed'),
    ('src/aotdiff/coupling/gating.py', 'return torch.sigmoid((sigma.log() - math.log(gate_sigma)) / width)', 'return torch.sigmoid((sigma.log() - math.log(gate_sigma)) * width)', 'tests/test_aot_variants.py -k gate_probability'),
    ('src/aotdiff/coupling/gating.py', 'return (sigma >= gate_sigma).to(sigma.dtype)', 'return (sigma > gate_sigma).to(sigma.dtype)', 'tests/test_aot_variants.py -k gate_probability'),
    ('src/aotdiff/train/rundir.py', 'if rec["kimg"] <= kimg + 1e-9 and (not kept or rec["kimg"] > kept[-1]["kimg"]):', 'if rec["kimg"] < kimg and (not kept or rec["kimg"] > kept[-1]["kimg"]):', 'tests/test_rundir.py -k "log_is_cut or jsonl_log"'),
    ('src/aotdiff/train/rundir.py', 'if rec["kimg"] <= kimg + 1e-9 and (not kept or rec["kimg"] > kept[-1]["kimg"]):', 'if rec["kimg"] <= kimg + 1e-9:', 'tests/test_rundir.py -k "log_is_cut or jsonl_log"'),
    ('src/aotdiff/train/config.py', '        return d[k] if k in d else LEGACY_VALUES.get(k)\n', '        return d.get(k)\n', 'tests/test_aot_variants.py -k runs_written_before'),
    ('src/aotdiff/cli/common.py', 'churn=args.churn, s_min=args.s_min, s_max=args.s_max, s_noise=args.s_noise,', 'churn=args.churn, s_min=args.s_min, s_max=args.s_max, s_noise=1.0,', 'tests/test_eval_cli.py'),
    ('src/aotdiff/train/config.py', '"aot_prefetch", "aot_backend", "compile",', '"aot_prefetch", "aot_backend", "compile", "aot_pool",', 'tests/test_rundir.py -k resume_refuses_every'),
    ('src/aotdiff/train/config.py', 'if not math.isfinite(value) or value < low or (value == low and not inclusive):', 'if not math.isfinite(value) or value < low:', 'tests/test_rundir.py -k validation_bounds'),
    ('src/aotdiff/train/config.py', 'if not 0 <= cfg.augment <= 1 or not 0 <= cfg.dropout < 1:', 'if not 0 <= cfg.augment <= 1 or not 0 <= cfg.dropout <= 1:', 'tests/test_rundir.py -k validation_bounds'),
    ('src/aotdiff/train/config.py', '    return TrainConfig.from_dict({**preset, **explicit, "preset": name})', '    return TrainConfig.from_dict({**explicit, **preset, "preset": name})', 'tests/test_rundir.py -k validation_bounds'),
    ('src/aotdiff/generate.py', 'if not 0 <= class_label < num_classes:', 'if not 0 <= class_label <= num_classes:', 'tests/test_sampling.py -k class_label_range'),
    ('src/aotdiff/generate.py', '        return torch.full((len(rng),), class_label, dtype=torch.int64)\n', '        return rng.randint(num_classes)\n', 'tests/test_sampling.py -k class_label_range'),
    ('src/aotdiff/generate.py', '        rng = SeedRNG(chunk)\n', '        rng = SeedRNG([s + start for s in chunk])\n', 'tests/test_sampling.py -k latent_then'),
    ('src/aotdiff/cli/sample.py', 'name = f"samples-{settings.solver}{settings.steps}-rho{settings.rho:g}{variant}.npz"', 'name = f"samples-{settings.solver}{settings.steps}{variant}.npz"', 'tests/test_eval_cli.py -k default_output_names'),
    ('src/aotdiff/cli/sample.py', 'default_out(args.model, settings, variant_tag(args))', 'default_out(args.model, settings)', 'tests/test_eval_cli.py -k default_output_names'),
    ('src/aotdiff/cli/common.py', 'parts.append("dg" if weight is None else f"dg{weight:g}")', 'parts.append("dg")', 'tests/test_eval_cli.py -k variant_tag'),
    ('src/aotdiff/cli/sample.py', 'model = load_model(args.model, ema=not args.raw, device=device)', 'model = load_model(args.model, ema=True, device=device)', 'tests/test_eval_cli.py -k raw_reads'),
    ('src/aotdiff/cli/fid.py', '    source = open_source(args.source, ema=not args.raw, device=device)', '    source = open_source(args.source, ema=True, device=device)', 'tests/test_eval_cli.py -k raw_reads'),
    ('src/aotdiff/cli/curvature.py', '    model = load_model(args.model, ema=not args.raw, device=device)', '    model = load_model(args.model, ema=True, device=device)', 'tests/test_eval_cli.py -k raw_reads'),
    ('src/aotdiff/cli/curvature.py', 'fine_steps=args.steps, rho=args.rho, sigma_min=args.sigma_min, sigma_max=args.sigma_max,', 'fine_steps=args.steps, rho=args.rho,', 'tests/test_eval_cli.py -k raw_reads'),
    ('src/aotdiff/cli/curvature.py', '        name = f"curvature-rho{args.rho:g}{variant_tag(args)}-n{len(seeds)}.json"', '        name = f"curvature-rho{args.rho:g}{variant_tag(args)}-n{args.num}.json"', 'tests/test_eval_cli.py -k default_output_names'),
    ('src/aotdiff/cli/curvature.py', '        name = f"curvature-rho{args.rho:g}{variant_tag(args)}-n{len(seeds)}.json"', '        name = f"curvature-rho{args.rho:g}-n{len(seeds)}.json"', 'tests/test_eval_cli.py -k default_output_names'),
    ('src/aotdiff/train/runloop.py', '            if created:\n                self._remove_untouched_run_dir()', '            pass', 'tests/test_rundir.py -k refused_input'),
    ('src/aotdiff/report.py', '    keys = list(dict.fromkeys((r.run, r.rho, r.dg_weight) for r in rows))', '    keys = list(dict.fromkeys((r.run, 0.0, r.dg_weight) for r in rows))', 'tests/test_sweep.py -k colours'),
    ('src/aotdiff/cli/sample.py', '        class_label=args.class_label, batch_size=max_batch, device=device, progress=bar.update,', '        class_label=None, batch_size=max_batch, device=device, progress=bar.update,', 'tests/test_cli.py -k conditional_aot'),
    ('src/aotdiff/cli/fid.py', '        seeds = seeds[:count] if seeds is not None else list(range(count))', '        seeds = seeds[-count:] if seeds is not None else list(range(count))', 'tests/test_eval_cli.py -k raw_reads'),
    ('src/aotdiff/cli/convert.py', '    weights = resolve_weights(args.source, ema=args.which == "ema")', '    weights = resolve_weights(args.source, ema=True)', 'tests/test_eval_cli.py -k convert_which'),
    ('src/aotdiff/cli/dg.py', '    out = args.out if args.out is not None else args.base.with_name(args.base.name + "-dg")', '    out = args.out if args.out is not None else args.base / "dg"', 'tests/test_cli.py -k default_run_dir'),
    ('src/aotdiff/cli/sweep.py', '        return parse_seeds(args.seeds)\n    return list(range(args.num if', '        return parse_seeds(args.seeds)[1:]\n    return list(range(args.num if', 'tests/test_sweep.py -k takes_the_sampling_flags'),
    ('src/aotdiff/cli/sweep.py', '        s_noise=args.s_noise,\n', '        s_noise=1.0,\n', 'tests/test_sweep.py -k takes_the_sampling_flags'),
    ('src/aotdiff/generate.py', '        labels = seed_labels(rng, num_classes, class_label)\n', '        labels = seed_labels(SeedRNG(chunk), num_classes, class_label)\n', 'tests/test_sampling.py -k latent_then'),
]
# fmt: on


def apply(path: str, old: str, new: str) -> str:
    """Write the mutant; return the original text (to restore)."""
    file = ROOT / path
    text = file.read_text()
    if text.count(old) != 1:
        raise LookupError(f"{path}: the text occurs {text.count(old)} times (expected once): update this entry")
    file.write_text(text.replace(old, new))
    return text


def run(index: int, path: str, old: str, new: str, tests: str) -> bool:
    """True if the tests caught the mutant."""
    original = apply(path, old, new)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider",
               *shlex.split(tests)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    finally:
        (ROOT / path).write_text(original)
    caught = proc.returncode != 0
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    print(
        f"[{index:3d}] {'caught  ' if caught else 'SURVIVED'} {path}: {new.strip()[:70]!r} ({last[0][:60]})", flush=True
    )
    return caught


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the catalogue with indices")
    p.add_argument("--only", default="", help="comma-separated indices to run")
    p.add_argument("--stale", action="store_true", help="only check that every entry's text occurs exactly once")
    args = p.parse_args()
    chosen = [int(i) for i in args.only.split(",") if i] or range(len(MUTANTS))
    if args.list:
        for i, (path, old, new, tests) in enumerate(MUTANTS):
            print(f"[{i:3d}] {path}: {old.strip()[:60]!r} -> {new.strip()[:60]!r}  ({tests})")
        return 0
    stale = [i for i in chosen if (ROOT / MUTANTS[i][0]).read_text().count(MUTANTS[i][1]) != 1]
    for i in stale:
        print(f"[{i:3d}] STALE {MUTANTS[i][0]}: {MUTANTS[i][1].strip()[:70]!r} no longer occurs once")
    if args.stale:
        return 1 if stale else 0
    survivors = [i for i in chosen if i not in stale and not run(i, *MUTANTS[i])]
    print(f"{len(chosen) - len(stale) - len(survivors)} caught, {len(survivors)} survived {survivors}, "
          f"{len(stale)} stale {stale}")  # fmt: skip
    return 1 if survivors or stale else 0


if __name__ == "__main__":
    sys.exit(main())
