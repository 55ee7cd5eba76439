#!/usr/bin/env python
"""QAT of a re-parameterized network for TIDL.

QAT runs on the deploy form (what TIDL executes), not on the multi-branch training form. BN restore
first puts a BatchNorm after each fused conv (statistics measured on data, function unchanged), so QAT
has the BN-folded conv it expects; CLE tames the outlier kernels so that the first quantized steps start
from a sane point.

    reparameterize → model_restore_bn → cross_layer_equalize → QuantTrainModule → train → freeze → evaluate

    python examples/reparam_qat.py --model repvgg --train-images 10000 --eval-images 2000
"""

from __future__ import annotations

import argparse
import math

import torch

import xnnq
from xnnq.data import Batches, batches, cifar10, evaluate
from xnnq.models.reparam import reparameterize
from xnnq.models.zoo import MODELS, load_pretrained
from xnnq.recipes import qat_finetune
from xnnq.utils.bn_restore import model_restore_bn
from xnnq.utils.cle import cross_layer_equalize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="repvgg", choices=sorted(MODELS))
    ap.add_argument("--train-images", type=int, default=10000, help="50000 = one epoch")
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)

    x_train, y_train = cifar10("train")
    x_test, y_test = cifar10("test")
    x_test, y_test = x_test[: args.eval_images], y_test[: args.eval_images]
    calib = [x for x, _ in batches(x_train[:500], y_train[:500], 100)]

    def calibrate(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for x in calib:
                model(x)

    deploy = reparameterize(load_pretrained(args.model))
    model_restore_bn(deploy, calibrate)
    cross_layer_equalize(deploy, calib[0])
    print(f"FP32 deploy form after BN restore + CLE: {evaluate(deploy.eval(), x_test, y_test):.2f}%")

    # constrain_weights=False: see reparam_ptq.py
    qmodel = xnnq.QuantTrainModule(deploy, torch.zeros(1, 3, 32, 32), constrain_weights=False)
    # SGD Nesterov with a cosine schedule; BN frozen from the start (keep the measured statistics: a short
    # fine-tune does not need batch statistics), activation ranges frozen half-way
    gen = torch.Generator().manual_seed(0)
    train = Batches(x_train, y_train, 128, shuffle=True, train_augment=True, generator=gen)
    steps = math.ceil(args.train_images / 128)
    qmodel = qat_finetune(qmodel, train, steps=steps, lr=args.lr, weight_decay=0.0)
    print(f"INT8 QAT ({args.train_images} images): {evaluate(qmodel, x_test, y_test):.2f}%")


if __name__ == "__main__":
    main()
