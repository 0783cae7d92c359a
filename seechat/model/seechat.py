"""SeeChat: a vision expert, a bridge and a text expert, passed in already built.

    image -> vision -> bridge -> N embeddings, scattered into the text at the image tokens -> llm
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SeeChatConfig
from ..data.processor import IGNORE_INDEX, SeeChatProcessor
from ..errors import SeeChatError
from .vision import VisionExpert


class SeeChat(nn.Module):
    """The stitched model. Build one with `seechat.build(config)` or load one with `seechat.load(dir)`."""

    def __init__(
        self,
        vision: VisionExpert,
        bridge: nn.Module,
        llm: nn.Module,
        processor: SeeChatProcessor,
        config: SeeChatConfig,
        *,
        sources: dict[str, str] | None = None,
        stop_token_ids: list[int] | None = None,
    ):
        super().__init__()
        self.vision = vision
        self.bridge = bridge
        self.llm = llm
        self.processor = processor
        self.config = config
        self.sources = dict(sources or {})
        """Resolved locations of the experts (absolute paths or hub ids), used when saving."""
        self.stop_token_ids = list(stop_token_ids or [])
        self.num_image_tokens: int = bridge.num_tokens(vision.num_tokens)
        if processor.num_image_tokens != self.num_image_tokens:
            raise SeeChatError(
                f"the processor expands <image> to {processor.num_image_tokens} tokens but the bridge gives "
                f"{self.num_image_tokens}"
            )
        self.image_token_id = processor.image_token_id
        self.supervised_head = False
        """Training: compute the output layer and loss only where labels are set (seechat train turns it on)."""
        self.feature_noise = 0.0
        """Training: noise on the vision features before the bridge, a share of each token's size (TrainConfig's)."""

    # -- properties -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def max_context(self) -> int:
        if self.config.max_context:
            return self.config.max_context
        cfg = self.llm.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return int(getattr(cfg, "max_position_embeddings", 2048))

    # -- the forward path -----------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) pixels -> (n, num_image_tokens, llm_hidden) embeddings."""
        vision_trains = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trains):
            feats = self.vision(pixel_values.to(self.vision.dtype))
        return self.project(feats)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(n, vision tokens, vision hidden) features of the vision expert -> (n, num_image_tokens, llm_hidden)."""
        bridge_dtype = next(self.bridge.parameters()).dtype
        features = features.to(bridge_dtype)
        if self.training and self.feature_noise and torch.is_grad_enabled():
            size = features.float().pow(2).mean(-1, keepdim=True).sqrt().to(bridge_dtype)
            features = features + self.feature_noise * size * torch.randn_like(features)
        return self.bridge(features).to(self.dtype)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with the image embeddings scattered into the image-token positions, in order.

        `image_embeds` may be (n, N, D) or already flat (n*N, D); their count must equal the number of
        image tokens in `input_ids`.
        """
        mask = input_ids == self.image_token_id
        found = int(mask.sum())
        flat = None if image_embeds is None else image_embeds.reshape(-1, image_embeds.shape[-1])
        given = 0 if flat is None else flat.shape[0]
        if found != given:
            raise SeeChatError(
                f"the input has {found} image tokens but the images give {given} embeddings "
                f"({self.num_image_tokens} per image): each image needs exactly one <image> marker"
            )
        return place_images(self.llm.get_input_embeddings(), input_ids, mask, flat if found else None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs,
    ):
        if image_embeds is None and image_features is not None and image_features.numel():
            image_embeds = self.project(image_features)  # the vision expert's output, read from a feature store
        elif image_embeds is None and pixel_values is not None and pixel_values.numel():
            image_embeds = self.encode_images(pixel_values)
        inputs_embeds = self.embed(input_ids, image_embeds)
        if labels is not None:  # training: no KV cache (with one, packed samples would not be kept apart)
            kwargs["use_cache"] = False
        if labels is not None and self.supervised_head and _plain_head(self.llm):
            return self._supervised_loss(inputs_embeds, attention_mask, labels, **kwargs)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def _supervised_loss(self, inputs_embeds, attention_mask, labels, num_items_in_batch=None, **kwargs):
        """The causal-LM loss with the output layer applied only at positions whose next token has a label.

        The same loss as the text expert's own (next-token cross-entropy in fp32, summed over labelled tokens
        and divided by num_items_in_batch, or averaged), but a caption that supervises 30 of 290 positions
        computes 30 rows of vocabulary logits instead of 290. The logits returned are those rows only.
        """
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("logits_to_keep", None)
        hidden = self.llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)[0]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        loss = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
        if torch.is_tensor(count):
            count = count.to(loss.device)
        return CausalLMOutputWithPast(loss=loss / count, logits=logits)

    def train(self, mode: bool = True) -> "SeeChat":
        """Like nn.Module.train, but a part with no trainable parameter stays in eval mode (no dropout)."""
        super().train(mode)
        for part in (self.vision, self.bridge, self.llm):
            if mode and not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, directory, *, llm_weights: str = "auto", state_dict: dict | None = None) -> None:
        """Write a model directory (see seechat.model.checkpoint)."""
        from .checkpoint import save

        save(self, directory, llm_weights=llm_weights, state_dict=state_dict)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Recompute activations in the backward pass of the parts that train (called by the HF Trainer)."""
        ckpt = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        if any(p.requires_grad for p in self.vision.parameters()):
            self.vision.model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)


def place_images(embedding: nn.Module, input_ids: torch.Tensor, image: torch.Tensor,
                 flat: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with the rows where `image` (a mask of input_ids) is set replaced by `flat`, in order."""
    # Image-token rows are replaced below, so any in-vocabulary id serves for the lookup.
    embeds = embedding(input_ids.masked_fill(image, 0))
    if flat is None:
        return embeds
    return embeds.masked_scatter(image.unsqueeze(-1), flat.to(embeds.dtype))


def _plain_head(llm) -> bool:
    """True when logits are just the output layer applied to the decoder's last hidden state (no logit scaling
    or soft-capping, which some families add in their own forward), so the supervised-positions path is exact."""
    cfg = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logit_scale",
                                                                  "logits_scaling", "output_multiplier_scale")):
        return False
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # under a peft wrapper
    if not type(base).__module__.startswith("transformers."):  # remote code: its forward may do more
        return False
    try:
        decoder = llm.get_decoder()
        return decoder is not None and decoder is not base and llm.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False
