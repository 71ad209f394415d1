"""`EmbedGraph`: token embeddings with the image features written into the image-token positions."""

from __future__ import annotations

import torch
from torch import nn

from .spec import BATCH, IMAGES, SEQ, GraphSpec, TensorSpec, embed_phases


class EmbedGraph(nn.Module):
    """`input_ids [B,T]` int64, `image_features [B,N,D]` -> `inputs_embeds [B,T,D]`.

    The k-th image token of a row receives `image_features[row, k]`. `N = 0` in decode. The lookup goes
    through a zero row prepended to the features, so text rows and `N = 0` need no special case.
    """

    def __init__(self, embed_tokens: nn.Embedding, image_token_id: int, dtype: torch.dtype, image_tokens: int = 0):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.image_token_id = int(image_token_id)
        self.dtype = dtype
        self.image_tokens = image_tokens  # N0 per image: the prefill range of the image_tokens dim

    def spec(self) -> GraphSpec:
        d = self.embed_tokens.embedding_dim
        return GraphSpec(
            "embed",
            (
                TensorSpec("input_ids", torch.int64, (BATCH, SEQ)),
                TensorSpec("image_features", self.dtype, (BATCH, IMAGES, d)),
            ),
            (TensorSpec("inputs_embeds", self.dtype, (BATCH, SEQ, d)),),
            embed_phases(self.image_tokens),
        )

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        is_image = input_ids == self.image_token_id  # [B,T]
        text = self.embed_tokens(torch.where(is_image, torch.zeros_like(input_ids), input_ids))  # [B,T,D]
        padded = torch.cat((torch.zeros_like(text[:, :1]), image_features.to(text.dtype)), dim=1)  # [B,1+N,D]
        slot = torch.cumsum(is_image.to(torch.int64), dim=1) * is_image.to(torch.int64)  # 0 = text, k = k-th image
        image = padded.gather(1, slot[:, :, None].expand(-1, -1, text.shape[2]))
        return torch.where(is_image[:, :, None], image, text)
