"""One of nnU-Net v2's own command-line entry points, with the benchmark's budget trainer handed to it by name.

    python benchmarks/nnunet_cli.py TRAINER_FILE nnUNetv2_train|nnUNetv2_predict [nnU-Net's arguments...]

nnU-Net finds a trainer class (``-tr``) by importing every module under
``nnunetv2.training.nnUNetTrainer`` and then ``nnUNet_extTrainer``. Some of those modules (the Primus
variants) import timm and with it torchvision, and PyPI's torchvision does not import beside a CPU-only
torch build ("operator torchvision::nms does not exist"), so the search fails before it reaches any
trainer. This runs nnU-Net's own entry point (its argument parsing, ``run_training``, ``nnUNetPredictor``)
unchanged, except that the lookup answers the budget trainer's name with the class from TRAINER_FILE
(every other name goes to nnU-Net's search as before).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ENTRY_POINTS = {
    "nnUNetv2_train": ("nnunetv2.run.run_training", "run_training_entry"),
    "nnUNetv2_predict": ("nnunetv2.inference.predict_from_raw_data", "predict_entry_point"),
}


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] not in ENTRY_POINTS:
        raise SystemExit(f"usage: {Path(sys.argv[0]).name} TRAINER_FILE {{{','.join(ENTRY_POINTS)}}} ARGS...")
    trainer_file, tool = Path(sys.argv[1]), sys.argv[2]
    spec = importlib.util.spec_from_file_location(trainer_file.stem, trainer_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = getattr(module, trainer_file.stem)

    from nnunetv2.utilities import find_objects

    search = find_objects.recursive_find_trainer_class_by_name

    def find(name: str):
        return trainer if name == trainer.__name__ else search(name)

    entry_module, entry = ENTRY_POINTS[tool]
    target = importlib.import_module(entry_module)
    target.recursive_find_trainer_class_by_name = find  # the name that module looks the class up by
    sys.argv = [tool, *sys.argv[3:]]
    getattr(target, entry)()


if __name__ == "__main__":
    main()
