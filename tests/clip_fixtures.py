"""Shared by test_clip.py and test_rewards.py: tiny CLIP models, tokenizers and processors in the public on-disk
formats, and an OpenCLIP ViT written out in plain torch (the independent reference for the OpenCLIP -> transformers
mapping)."""
import math

import torch
import torch.nn.functional as F
from PIL import Image


def pil(images: torch.Tensor) -> list:
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def rand_images(n, h, w, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def tiny_tokenizer(max_len=16):
    """A char-level CLIP BPE tokenizer whose start/end tokens are the last two ids, as in OpenAI CLIP's vocab."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def tiny_clip(seed=0, image_size=32, max_len=16):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tok = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                      vocab_size=514, max_position_embeddings=max_len, hidden_act="gelu", **tok),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_hidden_layers=2, image_size=image_size, patch_size=8, hidden_act="gelu"),
                     projection_dim=16)
    return CLIPModel(cfg).eval()


VIS = dict(width=32, layers=2, heads=4, patch=8, image=32)
TXT = dict(width=24, layers=2, heads=2, vocab=514, ctx=16)
EMBED = 12


def openclip_state_dict(seed=0) -> dict:
    """Random weights under OpenCLIP's key layout for open_clip.CLIP (ViT image tower, built-in text tower):
    visual.{conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks.i.*, ln_post, proj};
    token_embedding, positional_embedding, transformer.resblocks.i.*, ln_final, text_projection, logit_scale.
    A residual block is ln_1, attn (nn.MultiheadAttention: in_proj_weight/bias fused [q; k; v], out_proj),
    ln_2, mlp.c_fc, mlp.c_proj."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: s * torch.randn(*shape, generator=g)  # noqa: E731
    sd = {}

    def ln(name, w):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + r(w, s=0.1), r(w, s=0.1)

    def blocks(prefix, w, layers):
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            ln(p + "ln_1", w)
            ln(p + "ln_2", w)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * w, w), r(3 * w)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(w, w), r(w)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * w, w), r(4 * w)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(w, 4 * w), r(w)

    wv, wt = VIS["width"], TXT["width"]
    sd["visual.conv1.weight"] = r(wv, 3, VIS["patch"], VIS["patch"])
    sd["visual.class_embedding"] = r(wv)
    sd["visual.positional_embedding"] = r((VIS["image"] // VIS["patch"]) ** 2 + 1, wv)
    ln("visual.ln_pre", wv)
    blocks("visual.", wv, VIS["layers"])
    ln("visual.ln_post", wv)
    sd["visual.proj"] = r(wv, EMBED)
    sd["token_embedding.weight"] = r(TXT["vocab"], wt)
    sd["positional_embedding"] = r(TXT["ctx"], wt)
    blocks("", wt, TXT["layers"])
    ln("ln_final", wt)
    sd["text_projection"] = r(wt, EMBED)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return sd


def _openclip_block(x, sd, p, heads, causal):
    """One OpenCLIP residual block, written out: x + attn(ln_1(x)); x + mlp(ln_2(x)); exact GELU."""
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], sd[n + ".weight"], sd[n + ".bias"], 1e-5)  # noqa: E731
    b, n, w = x.shape
    q, k, v = (ln(x, p + "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).split(w, -1)
    q, k, v = (t.view(b, n, heads, w // heads).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / math.sqrt(w // heads)
    if causal:
        att = att.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
    x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = F.gelu(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def openclip_features(sd, pixel_values, token_ids):
    """OpenCLIP's encode_image / encode_text for the tiny config, in plain torch (the independent reference)."""
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], sd[n + ".weight"], sd[n + ".bias"], 1e-5)  # noqa: E731
    x = F.conv2d(pixel_values, sd["visual.conv1.weight"], stride=VIS["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = ln(x, "visual.ln_pre")
    for i in range(VIS["layers"]):
        x = _openclip_block(x, sd, f"visual.transformer.resblocks.{i}.", VIS["heads"], causal=False)
    image = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]
    t = sd["token_embedding.weight"][token_ids] + sd["positional_embedding"]
    for i in range(TXT["layers"]):
        t = _openclip_block(t, sd, f"transformer.resblocks.{i}.", TXT["heads"], causal=True)
    # OpenCLIP pools at argmax(token id): the end-of-text token has the largest id
    text = ln(t, "ln_final")[torch.arange(len(t)), token_ids.argmax(-1)] @ sd["text_projection"]
    return image, text


def openclip_ids(prompts):
    """OpenCLIP's tokenisation: [SOT] tokens [EOT], zero-padded to the context length."""
    ids = tiny_tokenizer(TXT["ctx"])(prompts, truncation=True, max_length=TXT["ctx"]).input_ids
    return torch.tensor([i + [0] * (TXT["ctx"] - len(i)) for i in ids])


def save_clip_processor(path, size=32):
    """A CLIPProcessor folder (tokenizer + image processor), as laion/CLIP-ViT-H-14's; the Pil image processor where
    transformers has it, so saving it needs no torchvision."""
    import transformers
    from transformers import CLIPProcessor

    image_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    CLIPProcessor(image_processor=image_processor(size={"shortest_edge": size},
                                                  crop_size={"height": size, "width": size}),
                  tokenizer=tiny_tokenizer()).save_pretrained(path)
    return str(path)
