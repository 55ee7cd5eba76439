"""A torchvision model on ImageFolder data: PTQ, accuracy, export (weights from a local file; no downloads).

    python examples/torchvision_imagefolder.py DATA_DIR [MODEL] [WEIGHTS] [SIZE]
    e.g. python examples/torchvision_imagefolder.py ~/imagenet-mini/val resnet18 resnet18.pth 224

DATA_DIR is <class>/<image>; the first half of each class calibrates, the second half evaluates.
Without WEIGHTS the model is randomly initialised (the accuracy is then chance; the flow is the same).
"""

import sys

import torch
import torchvision

import xnnq
from xnnq.data import batches, evaluate, load_image_folder
from xnnq.utils import load_state_dict_file

folder = sys.argv[1]
name = sys.argv[2] if len(sys.argv) > 2 else "resnet18"
weights = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
size = int(sys.argv[4]) if len(sys.argv) > 4 else 224

torch.manual_seed(0)
images, labels = load_image_folder(folder, limit=1000, size=size)  # uint8, resized and center-cropped
n_cls = int(labels.max()) + 1
model = torchvision.models.get_model(name, weights=None, num_classes=1000 if weights else n_cls)
if weights:
    model.load_state_dict(load_state_dict_file(weights))  # torch.load(weights_only=True)
model.eval()
cal = torch.zeros(len(labels), dtype=torch.bool)
cal[torch.argsort(labels, stable=True)[::2]] = True  # every other image of each class
test = ~cal

dummy = torch.randn(1, 3, size, size)
qmodel = xnnq.QuantCalibrateModule(model, dummy, method="mse", per_channel_q="depthwise").train()
with torch.no_grad():
    for x, _ in batches(images[cal], labels[cal], 32):
        qmodel(x)
qmodel.eval()
print(
    f"{name}: float {evaluate(model, images[test], labels[test], 50):.2f} %  "
    f"PTQ {evaluate(qmodel, images[test], labels[test], 50):.2f} %"
)
xnnq.export_onnx(qmodel, dummy, f"{name}_tidl.onnx")
