"""Which layer breaks the accuracy, and what to do about it: per-layer analysis of a RepVGG (deploy form) PTQ.

    python examples/analysis.py [out_dir] [test_images]     # default runs/analysis_example, 10000

Re-parameterized networks are the classic PTQ casualty: fusing the branches makes wide weight
distributions. The analysis ranks the layers, tells apart clipping error (``W clip %``) from rounding
error, and proposes the layers for 16 bits; each fix is then checked by evaluating the rebuilt model.
Needs the shared CIFAR-10 data ($XNNQ_DATA); the RepVGG checkpoint is committed in xnnq/models/checkpoints.
"""

import sys
from pathlib import Path

import torch

import xnnq
from xnnq.analysis.plots import save_plots
from xnnq.data import batches, cifar10, evaluate
from xnnq.models.reparam import reparameterize
from xnnq.models.zoo import load_pretrained

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/analysis_example")
model = reparameterize(load_pretrained("repvgg")).eval()  # deploy form: one 3x3 conv per block
x_cal, y_cal = cifar10("train", limit=512)
x_te, y_te = cifar10("test", limit=int(sys.argv[2]) if len(sys.argv) > 2 else None)
sample = list(batches(x_te[:512], y_te[:512], 64))


def ptq(**kwargs):
    q = xnnq.QuantCalibrateModule(model, torch.randn(1, 3, 32, 32), **kwargs).train()
    with torch.no_grad():
        for x, _ in batches(x_cal, y_cal, 64):
            q(x)
    return q.eval()


qmodel = ptq()
result = xnnq.utils.analyze(qmodel, model, sample)
save_plots(result, qmodel, out)
result.to_json(out / "report.json")
(out / "report.md").write_text(result.to_markdown())
print(result.to_markdown(top=5))
line = [f"float {evaluate(model, x_te, y_te):.2f} %", f"8-bit PTQ {evaluate(qmodel, x_te, y_te):.2f} %"]

clipped = [r.name for r in result.layers if (r.weight_clip_pct or 0) > 0]
if clipped:  # the error of those layers is the outlier clipping: keep their weights whole
    qmodel = ptq(constrain_weights=False)
    result = xnnq.utils.analyze(qmodel, model, sample, progress=False)
    acc = evaluate(qmodel, x_te, y_te)
    line.append(f"constrain_weights=False (clipped in {len(clipped)} layers) {acc:.2f} %")
layers = xnnq.utils.suggest_16bit(result, count=1)
mixed = ptq(constrain_weights=not clipped, bitwidth_overrides={name: 16 for name in layers})
line.append(f"+ {layers} in 16 bits {evaluate(mixed, x_te, y_te):.2f} %")
print(f"{len(y_te)} test images: " + " | ".join(line))
