#!/usr/bin/env python
"""PTQ of a re-parameterized network (RepVGG / MobileOne / QARepVGG / MobileNetV1) for TIDL.

    reparameterize  →  model_restore_bn  →  cross_layer_equalize  →  QuantCalibrateModule  →  evaluate

The deploy form (one conv per block) of RepVGG-like nets has outlier kernels (identity-branch BN of
near-zero-variance channels) that break per-tensor power-of-2 quantization; BN restore gives each conv a
BatchNorm holding its output statistics, and CLE moves the outliers' range into the neighbouring layer
(with high-bias absorption where exact). The quantizer folds the BatchNorms back.

    python examples/reparam_ptq.py --model repvgg --calib-images 500 --eval-images 2000
"""

from __future__ import annotations

import argparse

import torch

from xnnq.calibrate import QuantCalibrateModule
from xnnq.data import batches, cifar10, evaluate
from xnnq.models.reparam import reparameterize
from xnnq.models.zoo import MODELS, load_pretrained
from xnnq.utils.bn_restore import model_restore_bn
from xnnq.utils.cle import cross_layer_equalize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="repvgg", choices=sorted(MODELS))
    ap.add_argument("--calib-images", type=int, default=500)
    ap.add_argument("--eval-images", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)

    x_train, y_train = cifar10("train")
    x_test, y_test = cifar10("test")
    x_test, y_test = x_test[: args.eval_images], y_test[: args.eval_images]
    calib = [x for x, _ in batches(x_train[: args.calib_images], y_train[: args.calib_images], 100)]

    def calibrate(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for x in calib:
                model(x)

    model = load_pretrained(args.model)  # training form, committed CIFAR-10 weights
    deploy = reparameterize(model)  # one conv (+ReLU) per block, same function
    print(f"FP32 {args.model}: {evaluate(deploy, x_test, y_test):.2f}%")
    model_restore_bn(deploy, calibrate)  # identity BN with measured statistics after each conv
    cross_layer_equalize(deploy, calib[0])  # per-channel range equalization + high-bias absorption
    acc = evaluate(deploy.eval(), x_test, y_test)
    print(f"FP32 after BN restore + CLE: {acc:.2f}% (unchanged up to HBA)")

    # constrain_weights=False: fused kernels hold the identity branch as large centre taps (up to ~50σ),
    # which the default 15σ outlier clipping would cut off
    qmodel = QuantCalibrateModule(deploy, torch.zeros(1, 3, 32, 32), method="mse", constrain_weights=False)
    qmodel.train()  # calibration: forward passes in train mode
    calibrate(qmodel)
    qmodel.eval()
    print(f"INT8 PTQ (power-of-2, per-tensor): {evaluate(qmodel, x_test, y_test):.2f}%")


if __name__ == "__main__":
    main()
