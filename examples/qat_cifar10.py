"""QAT of the CIFAR-10 ResNet-20 for TIDL, then export (needs the shared data, $XNNQ_DATA).

    python examples/qat_cifar10.py [steps]      # default 391 steps = 1 epoch at batch 128
"""
import sys

import torch
import torch.nn.functional as F

import xnnq
from xnnq.data import batches, cifar10, data_root, evaluate
from xnnq.models.cifar_resnet import resnet20_cifar10

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 391
model = resnet20_cifar10(data_root() / "weights" / "resnet20_cifar10jpg.pt")
(x_tr, y_tr), (x_te, y_te) = cifar10("train"), cifar10("test")

qmodel = xnnq.QuantTrainModule(model, torch.randn(1, 3, 32, 32)).train()
xnnq.utils.freeze_bn(qmodel)                                     # BN statistics stay as trained
opt = torch.optim.SGD(qmodel.parameters(), lr=1e-4, momentum=0.9)
for step, (x, y) in enumerate(batches(x_tr, y_tr, 128, shuffle=True, train_augment=True)):
    if step == steps // 2:
        xnnq.layers.freeze_quant_range(qmodel)                   # ranges fixed for the second half
    if step == steps:
        break
    opt.zero_grad()
    F.cross_entropy(qmodel(x), y).backward()
    opt.step()
qmodel.eval()                                                    # now computes what TIDL computes
print(f"float {evaluate(model.eval(), x_te, y_te):.2f} %  QAT {evaluate(qmodel, x_te, y_te):.2f} %")
xnnq.export_onnx(qmodel, torch.randn(1, 3, 32, 32), "resnet20_qat_tidl.onnx")   # + resnet20_qat_tidl.tidl.json
