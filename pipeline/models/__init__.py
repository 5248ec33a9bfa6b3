"""Models: timm backbones, caption decoders, CLIP."""
