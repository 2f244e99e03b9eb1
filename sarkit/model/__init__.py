"""The SAR-KnowLIP model: a timm ViT and a BERT aligned by ITC, ITM and MLM.

Import the pieces from their modules (``sarkit.model.knowlip``, ``.text``, ``.vision``);
this package imports nothing heavy so the CLI stays fast.
"""

#: The 8 HCoT sub-text fields of the terrain task, in the fixed order texts are joined.
TERRAIN_FIELDS = (
    "Terrain",
    "Functionality",
    "Distribution",
    "Layout",
    "Boundary",
    "Buildings",
    "Roads",
    "Water",
)
