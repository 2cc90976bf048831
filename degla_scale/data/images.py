"""Training images as uint8 from the loader, normalised on the device.

The loader workers decode, resize and crop exactly as open_clip's evaluation preprocess of the model
does, but stop before `ToTensor` + `Normalize`: a batch crosses to the GPU as uint8 (4× fewer bytes
than fp32) from pinned memory, and `DeviceNormalize` turns it into the model's input dtype there.

JPEGs are decoded at reduced size when the transform downsizes anyway: libjpeg can scale by 1/2, 1/4
or 1/8 in the DCT domain (PIL's `Image.draft`), which skips most of the decode work; the draft is never
smaller than the transform's output side, and the resize then finishes the job. Against a full decode
the pixels differ by the resampling only (tests/data/test_images.py holds it to a mean |Δ| ≤ 1.5 and a
99th percentile ≤ 6 of 255 on textured 640×480 and 1024×768 JPEGs, measured 1.0 and 3; an image too
small to halve is decoded as before, pixel for pixel).
"""
from __future__ import annotations

import torch
from torchvision.transforms import Compose, PILToTensor


class TrainImageTransform:
    """PIL RGB image → uint8 [3, S, S]: open_clip's resize and crop for the model, no normalisation."""

    def __init__(self, open_clip_eval_transform: Compose, size: int, mean, std):
        geometric = [t for t in open_clip_eval_transform.transforms
                     if type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")]
        self.pipeline = Compose([*geometric, PILToTensor()])
        self.draft_size = size  # decode JPEGs at no less than this on either side
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image) -> torch.Tensor:
        return self.pipeline(image)


class DeviceNormalize:
    """uint8 images on the device → (x/255 − mean)/std in the model's dtype, computed in fp32; the
    mean and std live on the device once, so a step copies nothing host-to-device but the batch."""

    def __init__(self, mean, std, device: torch.device):
        self.mean_1311 = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(device)
        self.std_1311 = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(device)

    def __call__(self, images_B3HW: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = images_B3HW.float()
        if images_B3HW.dtype == torch.uint8:
            x = x / 255.0
        return ((x - self.mean_1311) / self.std_1311).to(dtype)
