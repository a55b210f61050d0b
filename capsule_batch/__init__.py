"""capsule_batch: whole-recording triage of video capsule endoscopy.

Importing the package is cheap: heavy optional packages (DALI, TensorRT, ONNX Runtime) are imported
only by the source or backend that needs them.
"""

__version__ = "0.1.0"
