"""ichnode inference: DICOM series to HU volume, the hemorrhage network, prediction,
Grad-CAM, the synthetic head-CT phantom, training and evaluation.

Arrays and pydicom datasets in, plain dataclasses out; nothing here touches the
network or the index.
"""
