"""The named comparisons of ``ds-seg3d experiment``: one entry each in ``COMPARISONS``."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ds_seg3d.experiment.spec import PY, Arm, Comparison, Settings, plan_cmd, shards_cmd
from ds_seg3d.paths import SAMPLE_CT_IMAGE, SAMPLE_CT_LABEL, shipped

PSOAS_ADVERSARIAL_WEIGHT = 0.05


def _adversarial(s: Settings) -> list[str]:
    # Segmentation alone for the first third: the discriminator judges shape, so the segmenter should
    # already outline the muscles when that judgement enters its loss.
    return ["--adversarial", "--adversarial_weight", str(PSOAS_ADVERSARIAL_WEIGHT),
            "--set", f"adversarial.warmup_steps={s.steps // 3}"]


PSOAS_ADVERSARIAL = Comparison(
    name="psoas-adversarial", heading="## Phantom psoas: adversarial vs not", task="psoas", labels="psoas=1",
    config="experiments/psoas_adversarial.toml", spacing=(1.2, 1.2, 3.0), val_fraction=0.1, test_fraction=0.3,
    arms=(Arm("baseline", "Dice + cross-entropy"),
          Arm("adversarial", f"Dice + cross-entropy + {PSOAS_ADVERSARIAL_WEIGHT} x the non-saturating term of a "
                             "PatchGAN discriminator after a warm-up of a third of the steps", _adversarial)),
    question=(
        "Does adversarial training help a 3D CNN find the psoas among iso-dense muscles? (A report found psoas "
        "Dice 0.863 -> 0.918 with a 3D CNN.) Both arms train the shards' planned 3D U-Net (nnU-Net's topology, "
        "deep supervision and augmentation; `experiments/psoas_adversarial.toml`) on the same phantom shards with "
        "the same seeds, patch, steps and DeepSpeed config; the adversarial arm adds `--adversarial "
        f"--adversarial_weight {PSOAS_ADVERSARIAL_WEIGHT}` (the project default) and a warm-up of a third of the "
        "steps. Both were fixed before running, not tuned; each arm is scored with its final weights on the "
        "test split, which nothing else looks at. Each seed draws its own phantoms, split and training."),
    caveat=("A few test phantoms per seed and a short CPU budget: a difference within the seed-to-seed spread "
            "says nothing either way, and phantoms are not the report's CT scans."),
    scale_up=(
        "The same command with GPU settings (launched from the folder holding `.deepspeed_env`, if any):\n\n"
        "```\nds-seg3d experiment psoas-adversarial --out /scratch/psoas-adversarial --cases 200 \\\n"
        "    --steps 5000 --ranks 8 --stages 4 --seeds 0 1 2 --hostfile hostfile --phantom-shape 192 192 96 \\\n"
        "    --deepspeed-config ds_configs/pipeline_zero1_gpu_bf16.json \\\n"
        "    --discriminator-config ds_configs/discriminator_gpu_bf16.json --plan-budget-gb 40 --plan-base-width 32\n"
        "```\n\n"
        "The hostfile's slots give the ranks (4 stages on 8 GPUs: 2 data-parallel replicas); the shards' 3D U-Net "
        "is planned for 40 GB per GPU over the 4 stages with nnU-Net's widths (32, capped at 320); both engines "
        "train in bf16 with fp32 master weights; 4 micro-batches per step fill the pipeline; the warm-up "
        "stays a third of the steps; prediction runs on one GPU. For real CT, build shards from "
        "TotalSegmentator (`--labels \"psoas=iliopsoas_left,iliopsoas_right\"`) and launch each arm's "
        "training command from its `train.log` on them."),
)


def _adversarial_variant(*sets: str) -> Callable[[Settings], list[str]]:
    return lambda s: [*_adversarial(s), *[x for item in sets for x in ("--set", item.format(third=s.steps // 3))]]


PSOAS_ADVERSARIAL_VARIANTS = Comparison(
    name="psoas-adversarial-variants", heading="## Phantom psoas: what the adversarial term needs",
    task="psoas", labels="psoas=1", config="experiments/psoas_adversarial.toml", spacing=(1.2, 1.2, 3.0),
    val_fraction=0.1, test_fraction=0.3,
    arms=(Arm("baseline", "Dice + cross-entropy"),
          Arm("adversarial", "+ the adversarial term as in `psoas-adversarial`", _adversarial),
          Arm("steadied", "+ the term with one-sided label smoothing 0.1 and its weight ramped up over a third "
                          "of the steps", _adversarial_variant("adversarial.label_smoothing=0.1",
                                                               "adversarial.ramp_steps={third}")),
          Arm("r1", "+ the term with an R1 gradient penalty (gamma 1) on the discriminator",
              _adversarial_variant("adversarial.gradient_penalty=1.0")),
          Arm("slow-d", "+ the term with the discriminator's learning rate a tenth of its JSON's (2e-5)",
              _adversarial_variant("adversarial.discriminator_lr=2e-5"))),
    question=(
        "When the adversarial term lowers psoas Dice, is it the discriminator winning too easily (near 100 % "
        "accuracy on the segmenter's maps, so its gradient says little about shape)? Each arm adds one of the "
        "usual remedies to the `psoas-adversarial` set-up: one-sided label smoothing with a ramped weight, an R1 "
        "gradient penalty, a slower discriminator. All arms train the shards' planned 3D U-Net on the same "
        "phantom shards with the same seeds, steps and DeepSpeed configs; the remedies' sizes are the common "
        "defaults, fixed before running. The discriminator's accuracies at the end of training (d_acc_real, "
        "d_acc_fake) are listed per arm."),
    caveat=("Few test phantoms per seed and a short CPU budget: differences within the seed-to-seed spread say "
            "nothing either way."),
    scale_up=("The same command with the GPU settings of `psoas-adversarial` (its section above)."),
)


def kidney_target(rows: list[dict]) -> str:
    """The report's clinical target for the 3D network: Dice >= 0.95 and |volume error| < 5 % on >= 95 % of
    cases; and no bias beyond 3 % either way (the mean signed volume error)."""
    mine = [r for r in rows if r["arm"] == "3d"]
    goal = ("Target for the 3D network (mean Dice >= 0.95, volume error < 5 % on >= 95 % of test cases, mean "
            "signed volume error within +-3 %)")
    if not mine:
        return f"{goal}: not measured (no 3d scores)."
    dice = float(np.mean([float(r["dice"]) for r in mine]))
    errors = [float(r["volume_error_pct"]) for r in mine]
    under = sum(abs(e) < 5 for e in errors)
    share, bias = under / len(mine), float(np.mean(errors))
    met = dice >= 0.95 and share >= 0.95 and abs(bias) <= 3
    return (f"{goal}: {'MET' if met else 'NOT MET'} here (mean Dice {dice:.3f}; {under}/{len(mine)} = "
            f"{100 * share:.0f} % of cases under 5 %; mean signed volume error {bias:+.1f} %).")


KIDNEY_3D_VS_2D = Comparison(
    name="kidney-3d-vs-2d", heading="## Phantom polycystic kidneys: 3D pipelined CNN vs 2D CNN", task="kidney",
    labels="kidney=1", config="experiments/kidney_demo.toml", spacing=(1.2, 1.2, 3.0), val_fraction=0.1,
    test_fraction=0.3,
    arms=(Arm("2d", "the shards' planned 2D U-Net on axial slices (`cnn2d`)", config="experiments/kidney_2d.toml"),
          Arm("3d", "the shards' planned 3D U-Net (`unet3d`), the demo's network")),
    defaults=Settings(steps=500),
    target=kidney_target,
    question=(
        "Does a 3D CNN segment polycystic kidneys better than a 2D CNN? (A report found Dice 0.852 with a 2D CNN "
        "and 0.950 with a 25-layer 3D CNN, and volume errors under 5 %.) Each arm is the network nnU-Net's rules "
        "configure from the same shards (`ds-seg3d plan`): the 3D U-Net (per-axis pooling and kernels from the "
        "1.2 x 1.2 x 3.0 mm spacing) and the slice-wise 2D U-Net (in-plane pooling, widths capped at 16 x the "
        "base, as many slices per sample as give the 3D patch's voxels), both sized for the same memory of 2 "
        "pipeline stages, and both trained with the same recipe: steps, seeds, deep supervision, nnU-Net's "
        "augmentation, foreground oversampling 0.33, DeepSpeed config, test-time mirroring. The 2D network sees "
        "each slice alone (its convolutions and normalisation never cross slices). Nothing was tuned on the "
        "test split; each seed draws its own phantoms, split and training."),
    caveat=("Phantoms, a few test cases per seed and a short CPU budget; phantoms are not the report's CT "
            "scans, and networks this narrow and this briefly trained say little about the ceiling of either "
            "design."),
    scale_up=(
        "The same comparison with GPU settings (launched from the folder holding `.deepspeed_env`, if any):\n\n"
        "```\nds-seg3d experiment kidney-3d-vs-2d --out /scratch/kidney-3d-vs-2d --cases 200 \\\n"
        "    --steps 5000 --ranks 8 --stages 4 --seeds 0 1 2 --hostfile hostfile --phantom-shape 192 192 96 \\\n"
        "    --deepspeed-config ds_configs/pipeline_zero1_gpu_bf16.json --plan-budget-gb 40 --plan-base-width 32\n"
        "```\n\n"
        "The hostfile's slots give the ranks (4 stages on 8 GPUs: 2 data-parallel replicas); both networks are "
        "planned for 40 GB per GPU over the 4 stages with nnU-Net's widths (32, capped at 320 in 3D and 512 in "
        "2D); bf16 with fp32 master weights; 4 micro-batches per step fill the pipeline. "
        "`benchmarks/gpu_checks.sh` runs a one-GPU version of this comparison."),
)


def real_ct_data(c: Comparison, s: Settings, out: Path) -> list[tuple[str, list[str]]]:
    """The scan's right half and mirrored left half as two cases, then shards: train on one, score the other."""
    return [("halves", [*PY, "data_tools", "halves", str(SAMPLE_CT_IMAGE), str(SAMPLE_CT_LABEL),
                        str(out / "halves"), "--name", "ct",
                        "--labels", "kidney=2,3;psoas=88,89"]),
            shards_cmd(c, s, out / "halves", out), plan_cmd(s, out)]


REAL_CT = Comparison(
    name="real-ct", heading="## Real CT: agreement with TotalSegmentator's kidney and psoas labels", task="real CT",
    labels="kidney=1,psoas=2", config="experiments/realct_3d.toml", spacing=(3.0, 3.0, 3.0), val_fraction=0.0,
    test_fraction=0.5,
    arms=(Arm("2d", "the shards' planned 2D U-Net on axial slices (`cnn2d`)", config="experiments/realct_2d.toml"),
          Arm("3d", "the shards' planned 3D U-Net (`unet3d`)")),
    defaults=Settings(steps=900),
    data=real_ct_data,
    phantoms=False,
    reframe=(2.0, 0.3),
    data_text=lambda c, s, splits: (
        "the real abdominal CT of `ds_seg3d/sample_data/totalseg_small` (122 x 101 x 30 voxels at 3 mm; see its NOTICE) cut "
        "at the middle of the left-right axis into its right half and its mirrored left half "
        f"(`data_tools halves`; {splits}: the split's seed {s.seed} decides which half trains)"),
    question=(
        "How well do the 3D and the 2D network learn kidneys and psoas from one real CT? The reference labels "
        "are TotalSegmentator's output on this scan, not hand-drawn: the numbers below are agreement with "
        "TotalSegmentator, not accuracy. One scan gives no held-out case, so it is cut into its right half and "
        "its mirrored left half; the networks train on one half and are scored on the other, whose kidney "
        "and psoas they never saw (a left-right mirror of anatomy, not a new patient)."),
    caveat=("One scan, one training half: a sanity check that the whole path runs on real CT and "
            "learns from it, not an estimate of accuracy on new patients; the psoas here is only its upper "
            "part (about 10 mL per side in this upper-abdomen field of view)."),
    scale_up=(
        "For a real dataset, build shards from TotalSegmentator folders and run either arm's training command "
        "(in `arms/<arm>/train.log`) on them with GPU settings, e.g.:\n\n"
        "```\ndata-tools build-shards /data/totalseg /scratch/shards \\\n"
        "    --labels \"kidney=kidney_left,kidney_right;psoas=iliopsoas_left,iliopsoas_right\"\n"
        "ds-seg3d plan /scratch/shards --budget-gb 40 --ranks 8 --stages 4\n"
        "deepspeed --hostfile hostfile --module ds_seg3d.train --data /scratch/shards --out /scratch/run \\\n"
        "    --config experiments/realct_3d.toml --stages 4 --steps 20000 \\\n"
        "    --deepspeed_config ds_configs/pipeline_zero1_gpu_bf16.json\n```"),
)

ADAM_CONFIG, SGD_CONFIG = "ds_configs/pipeline_zero1_cpu_fp32.json", "ds_configs/pipeline_zero1_cpu_fp32_sgd.json"

KIDNEY_OPTIMIZER = Comparison(
    name="kidney-optimizer", heading="## Phantom polycystic kidneys: Adam with a cosine schedule vs nnU-Net's SGD",
    task="kidney", labels="kidney=1", config="experiments/kidney_demo.toml", spacing=(1.2, 1.2, 3.0),
    val_fraction=0.1, test_fraction=0.3,
    arms=(Arm("adam", "Adam, lr 2e-3, 10 warm-up steps then a cosine decay (`pipeline_zero1_cpu_fp32.json`)",
              lambda s: ["--deepspeed_config", str(shipped(ADAM_CONFIG))]),
          Arm("sgd", "SGD with Nesterov momentum 0.99, lr 1e-2, poly decay (exponent 0.9), weight decay 3e-5: "
                     "nnU-Net's (`pipeline_zero1_cpu_fp32_sgd.json`)",
              lambda s: ["--deepspeed_config", str(shipped(SGD_CONFIG))])),
    defaults=Settings(steps=500),
    question=(
        "Which optimizer should the project default to on this budget? Both arms train the demo's planned 3D "
        "U-Net (`experiments/kidney_demo.toml`: nnU-Net's topology, deep supervision and augmentation) on the "
        "same phantom shards with the same seeds and steps; only the optimizer and its schedule differ. nnU-Net "
        "trains with SGD for 250,000 iterations; this asks which converges better in a few hundred."),
    caveat="Phantoms and a short CPU budget: the choice is for this budget, not a claim about long training.",
    scale_up=("On GPUs both configurations exist in bf16 (`pipeline_zero1_gpu_bf16.json`, "
              "`pipeline_zero1_gpu_bf16_sgd.json`); the same command with `--deepspeed-config` set to either."),
)

COMPARISONS: dict[str, Comparison] = {c.name: c for c in (
    PSOAS_ADVERSARIAL, KIDNEY_3D_VS_2D, REAL_CT, KIDNEY_OPTIMIZER, PSOAS_ADVERSARIAL_VARIANTS)}
