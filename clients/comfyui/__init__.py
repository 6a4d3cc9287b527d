"""FaceDetailer (Ray Serve): a ComfyUI custom node that details faces on a facedetailer-serve endpoint.

Install: link or copy this folder into ``ComfyUI/custom_nodes/`` (see README.md beside this file).
Importing it needs neither ComfyUI nor a GPU; running the node needs ``httpx`` and the
``facedetailer_client`` package (found installed, or in the facedetailer-serve checkout this
folder belongs to).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
