"""Task front-ends on top of the wrappers and export_onnx: data, decoding, metrics, task-specific artifacts.

``xnnq.tasks.detection`` — COCO-format detection: ``batches``, ``evaluate`` (pycocotools), ``export``
(ONNX + TIDL options with the object-detection fields + the meta-architecture prototxt).
``xnnq.tasks.segmentation`` — image + mask folders: ``batches``, ``evaluate`` (mIoU), ``export`` (ArgMax head).
"""
