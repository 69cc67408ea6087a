"""Models: SirenNet, the CS-UNet denoiser and the SH + Siren location encoder."""
from locdiff.models.cs_unet import CSUNet, CSUNetConfig
from locdiff.models.location_encoder import LocationEncoder
from locdiff.models.siren import SirenLayer, SirenNet

__all__ = ["CSUNet", "CSUNetConfig", "LocationEncoder", "SirenLayer", "SirenNet"]
