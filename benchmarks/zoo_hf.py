"""The HuggingFace transformers set of the zoo: architectures built from small configs (no
weights), each with the example and fresh inputs ``benchmarks/zoo.py`` folds and checks on.

Vision models take 64×64 images (an example batch of 1, a fresh batch of 3); the language
models take 7 token ids (an example batch of 1) and a fresh batch of 3 of 11 tokens (neither
the batch nor the sequence length is fixed by the capture).
"""

from __future__ import annotations

from typing import Any

FOUR = {"depths": [1, 1, 1, 1], "num_labels": 5}
TINY_VIT = {
    "image_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "num_labels": 5,
}  # fmt: skip
TINY_LLM = {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1,
}  # fmt: skip

# name → (config class, model class, config fields)
VISION: dict[str, tuple[str, str, dict[str, Any]]] = {
    "poolformer": ("PoolFormerConfig", "PoolFormerForImageClassification",
                   {"hidden_sizes": [16, 16, 32, 32], **FOUR}),
    "swiftformer": ("SwiftFormerConfig", "SwiftFormerForImageClassification",
                    {"embed_dims": [16, 16, 32, 32], **FOUR}),
    "efficientnet": ("EfficientNetConfig", "EfficientNetForImageClassification",
                     {"width_coefficient": 0.25, "depth_coefficient": 0.25, "hidden_dim": 320,
                      "image_size": 64, "num_labels": 5}),
    "resnet": ("ResNetConfig", "ResNetForImageClassification",
               {"embedding_size": 16, "hidden_sizes": [16, 32, 32, 64], **FOUR}),
    "regnet": ("RegNetConfig", "RegNetForImageClassification",
               {"embedding_size": 16, "hidden_sizes": [16, 32, 32, 64], "groups_width": 8,
                **FOUR}),
    "bit": ("BitConfig", "BitForImageClassification",
            {"embedding_size": 32, "hidden_sizes": [32, 64, 64, 128], "num_groups": 4, **FOUR}),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification",
                 {"hidden_sizes": [16, 16, 32, 32], **FOUR}),
    "convnextv2": ("ConvNextV2Config", "ConvNextV2ForImageClassification",
                   {"hidden_sizes": [16, 16, 32, 32], **FOUR}),
    "mobilenet_v1": ("MobileNetV1Config", "MobileNetV1ForImageClassification",
                     {"depth_multiplier": 0.25, "image_size": 64, "num_labels": 5}),
    "mobilenet_v2": ("MobileNetV2Config", "MobileNetV2ForImageClassification",
                     {"depth_multiplier": 0.25, "image_size": 64, "num_labels": 5}),
    "mobilevit": ("MobileViTConfig", "MobileViTForImageClassification",
                  {"image_size": 64, "hidden_sizes": [16, 24, 32],
                   "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64], "num_labels": 5}),
    "mobilevitv2": ("MobileViTV2Config", "MobileViTV2ForImageClassification",
                    {"image_size": 64, "width_multiplier": 0.5, "num_labels": 5}),
    "cvt": ("CvtConfig", "CvtForImageClassification",
            {"depth": [1, 2, 3], "embed_dim": [16, 32, 48], "num_heads": [1, 2, 3],
             "num_labels": 5}),
    "focalnet": ("FocalNetConfig", "FocalNetForImageClassification",
                 {"embed_dim": 16, "image_size": 64, **FOUR}),
    "levit": ("LevitConfig", "LevitForImageClassification",
              {"image_size": 64, "hidden_sizes": [32, 48, 64], "num_attention_heads": [1, 2, 2],
               "depths": [1, 1, 1], "key_dim": [8, 8, 8], "num_labels": 5}),
    "vit": ("ViTConfig", "ViTForImageClassification", TINY_VIT),
    "deit": ("DeiTConfig", "DeiTForImageClassification", TINY_VIT),
    "beit": ("BeitConfig", "BeitForImageClassification",
             {**TINY_VIT, "use_mean_pooling": True, "layer_scale_init_value": 0.1}),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification",
               {k: v for k, v in TINY_VIT.items() if k != "intermediate_size"}),
    "swin": ("SwinConfig", "SwinForImageClassification",
             {"image_size": 64, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2],
              "window_size": 4, "num_labels": 5}),
    "swinv2": ("Swinv2Config", "Swinv2ForImageClassification",
               {"image_size": 64, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2],
                "window_size": 4, "num_labels": 5}),
    "pvt": ("PvtConfig", "PvtForImageClassification",
            {"image_size": 64, "hidden_sizes": [16, 32, 80, 128], **FOUR}),
    "segformer": ("SegformerConfig", "SegformerForSemanticSegmentation",
                  {"hidden_sizes": [16, 16, 32, 32], "decoder_hidden_size": 32, **FOUR}),
}  # fmt: skip
LANGUAGE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", TINY_LLM),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", TINY_LLM),
}
NAMES = [*VISION, "upernet_convnext", *LANGUAGE]


def build(name: str) -> tuple[Any, tuple, tuple]:
    """The model ``name`` (random weights), its example inputs and a fresh input."""
    import torch
    import transformers as hf

    if name == "upernet_convnext":
        backbone = hf.ConvNextConfig(
            hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 1, 1],
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )  # fmt: skip
        config = hf.UperNetConfig(
            backbone_config=backbone, hidden_size=32, auxiliary_in_channels=32, num_labels=3
        )
        model = hf.UperNetForSemanticSegmentation(config)
    else:
        config_class, model_class, fields = {**VISION, **LANGUAGE}[name]
        model = getattr(hf, model_class)(getattr(hf, config_class)(**fields))
    g = torch.Generator().manual_seed(0)
    if name in LANGUAGE:
        return model, (torch.randint(0, 64, (1, 7), generator=g),), (torch.randint(0, 64, (3, 11)),)
    return model, (torch.randn(1, 3, 64, 64, generator=g),), (torch.randn(3, 3, 64, 64),)
