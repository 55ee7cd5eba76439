"""QAT of the CIFAR-10 ResNet-20 for TIDL, then export (needs the shared data, $XNNQ_DATA).

python examples/qat_cifar10.py [epochs]      # default 1 epoch (391 steps at batch 128)
"""

import sys

import torch

import xnnq
from xnnq.data import Batches, cifar10, data_root, evaluate
from xnnq.models.cifar_resnet import resnet20_cifar10
from xnnq.recipes import qat_finetune

epochs = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
torch.manual_seed(0)
model = resnet20_cifar10(data_root() / "weights" / "resnet20_cifar10jpg.pt")
(x_tr, y_tr), (x_te, y_te) = cifar10("train"), cifar10("test")
train = Batches(x_tr, y_tr, 128, shuffle=True, train_augment=True, generator=torch.Generator().manual_seed(0))

qmodel = xnnq.QuantTrainModule(model, torch.randn(1, 3, 32, 32))  # the float model is not modified
# SGD + cosine; BN frozen from the start, ranges frozen half-way; returns the wrapper in eval mode
qmodel = qat_finetune(qmodel, train, epochs=epochs, lr=1e-4)
print(f"float {evaluate(model.eval(), x_te, y_te):.2f} %  QAT {evaluate(qmodel, x_te, y_te):.2f} %")
xnnq.export_onnx(qmodel, torch.randn(1, 3, 32, 32), "resnet20_qat_tidl.onnx")  # + resnet20_qat_tidl.tidl.json
