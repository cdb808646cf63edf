"""The network: ResNet backbone, FPN, RetinaNet / consistent heads, and the detector that joins them."""
