"""Task front-ends on top of the wrappers and the export: data, decoding, metrics, task-specific artifacts.

``xnnq.tasks.detection`` — COCO-format detection: ``batches``, ``evaluate`` (pycocotools), ``export``
(ONNX + TIDL options with the object-detection fields + the meta-architecture prototxt).
"""
