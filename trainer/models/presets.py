"""Named CLIP architectures (plain data, no torch import).

Values follow the OpenAI CLIP / open_clip model configs: ViT-B/32, ViT-B/16 and ViT-L/14 at
224 px with a 77-token CLIP BPE text tower. OpenAI's checkpoints use QuickGELU; open_clip's
LAION-trained ones use GELU: set ``model.vision.act`` / ``model.text.act`` to match the weights
(``tools/convert_checkpoint.py import`` does that from the source config).
"""

_TEXT_512 = dict(context_length=77, vocab_size=49408, width=512, layers=12, heads=8,
                 mlp_ratio=4.0, act="quick_gelu", ln_eps=1e-5, eot_token_id=-1)

MODEL_PRESETS: dict[str, dict] = {
    # A laptop-sized CLIP for tests and smoke runs (same tokenizer as the real ones).
    "tiny": dict(
        embed_dim=32,
        vision=dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0,
                    act="gelu", ln_eps=1e-5),
        text=dict(context_length=16, vocab_size=49408, width=64, layers=2, heads=4, mlp_ratio=4.0,
                  act="gelu", ln_eps=1e-5, eot_token_id=-1),
    ),
    "vit-b-32": dict(
        embed_dim=512,
        vision=dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0,
                    act="quick_gelu", ln_eps=1e-5),
        text=dict(_TEXT_512),
    ),
    "vit-b-16": dict(
        embed_dim=512,
        vision=dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0,
                    act="quick_gelu", ln_eps=1e-5),
        text=dict(_TEXT_512),
    ),
    "vit-l-14": dict(
        embed_dim=768,
        vision=dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_ratio=4.0,
                    act="quick_gelu", ln_eps=1e-5),
        text=dict(_TEXT_512, width=768, heads=12),
    ),
}
