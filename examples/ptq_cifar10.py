"""Post-training quantization (calibration, no training) of the CIFAR-10 ResNet-20, export in both formats.

python examples/ptq_cifar10.py [calibration images]     # default 512
"""

import sys

import torch

import xnnq
from xnnq.data import batches, cifar10, data_root, evaluate
from xnnq.export.check import onnx_accuracy
from xnnq.models.cifar_resnet import resnet20_cifar10

n_calib = int(sys.argv[1]) if len(sys.argv) > 1 else 512
model = resnet20_cifar10(data_root() / "weights" / "resnet20_cifar10jpg.pt").eval()
x_cal, y_cal = cifar10("train", limit=n_calib)
x_te, y_te = cifar10("test")

qmodel = xnnq.QuantCalibrateModule(model, torch.randn(1, 3, 32, 32), method="mse").train()  # calibration mode
with torch.no_grad():
    for x, _ in batches(x_cal, y_cal, 64):
        qmodel(x)
qmodel.eval()  # ranges chosen: TIDL's numerics
print(f"float {evaluate(model, x_te, y_te):.2f} %  PTQ {evaluate(qmodel, x_te, y_te):.2f} %")
for fmt in ("tidl", "qdq"):
    path = xnnq.export_onnx(qmodel, torch.randn(1, 3, 32, 32), f"resnet20_ptq_{fmt}.onnx", format=fmt).path
    print(f"{path}: onnxruntime {onnx_accuracy(path, batches(x_te, y_te, 500)):.2f} %")
