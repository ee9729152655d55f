import torch

import models_mae
from util.pos_embed import get_2d_sincos_pos_embed


def tiny(**kw):
    kw = {"img_size": 32, "patch_size": 4, "nb_classes": 10, **kw}
    return models_mae.mae_vit_tiny_patch16(**kw)


def test_masking_keeps_exact_count_and_unshuffles():
    torch.manual_seed(0)
    n, length, dim = 4, 64, 8
    x = torch.arange(n * length, dtype=torch.float32).view(n, length, 1).expand(-1, -1, dim).clone()
    for ratio in (0.0, 0.5, 0.75, 0.9):
        kept, mask, ids_restore = models_mae.MaskedAutoencoderViT.random_masking(x, ratio)
        keep = int(length * (1 - ratio))
        assert kept.shape == (n, keep, dim)
        assert (mask.sum(dim=1) == length - keep).all()
        # the kept tokens are exactly the unmasked positions, per sample
        for i in range(n):
            kept_pos = set((kept[i, :, 0] - i * length).long().tolist())
            assert kept_pos == set(torch.nonzero(mask[i] == 0).flatten().tolist())
        # kept tokens + placeholders, unshuffled with ids_restore, restore the original order
        filler = torch.full((n, length - keep, dim), -1.0)
        full = torch.gather(torch.cat([kept, filler], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        visible = mask == 0
        assert torch.equal(full[visible], x[visible])
        assert (full[~visible] == -1).all()


def test_masks_differ_per_sample():
    torch.manual_seed(0)
    _, mask, _ = models_mae.MaskedAutoencoderViT.random_masking(torch.zeros(8, 64, 4), 0.75)
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_patchify_roundtrip_and_layout():
    m = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    patches = m.patchify(imgs)
    assert patches.shape == (2, 64, 4 * 4 * 3)
    assert torch.equal(m.unpatchify(patches), imgs)
    # patch 1 is the second 4x4 block of the first row, pixels in (p, q, c) order
    assert torch.equal(patches[0, 1].view(4, 4, 3), imgs[0, :, 0:4, 4:8].permute(1, 2, 0))


def _expected_official_shapes(embed, depth, dec_embed, dec_depth, patch, img=224):
    L = (img // patch) ** 2
    shapes = {"cls_token": (1, 1, embed), "pos_embed": (1, L + 1, embed),
              "patch_embed.proj.weight": (embed, 3, patch, patch), "patch_embed.proj.bias": (embed,),
              "norm.weight": (embed,), "norm.bias": (embed,),
              "decoder_embed.weight": (dec_embed, embed), "decoder_embed.bias": (dec_embed,),
              "mask_token": (1, 1, dec_embed), "decoder_pos_embed": (1, L + 1, dec_embed),
              "decoder_norm.weight": (dec_embed,), "decoder_norm.bias": (dec_embed,),
              "decoder_pred.weight": (patch * patch * 3, dec_embed), "decoder_pred.bias": (patch * patch * 3,)}
    for prefix, n, d in (("blocks", depth, embed), ("decoder_blocks", dec_depth, dec_embed)):
        for i in range(n):
            b = f"{prefix}.{i}."
            shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                           b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                           b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                           b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                           b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                           b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    return shapes


def test_official_state_dict_keys_shapes_and_param_counts():
    # trainable parameter counts of the official models (REFERENCE.md)
    expected = {"mae_vit_base_patch16": ((768, 12, 512, 8, 16), 111_655_680),
                "mae_vit_large_patch16": ((1024, 24, 512, 8, 16), 329_239_296),
                "mae_vit_huge_patch14": ((1280, 32, 512, 8, 14), 656_613_964)}
    for name, (arch, count) in expected.items():
        with torch.device("meta"):
            model = models_mae.MODELS[name]()
        sd = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("online_head.")}
        assert sd == _expected_official_shapes(*arch), name
        n = sum(p.numel() for k, p in model.named_parameters()
                if p.requires_grad and not k.startswith("online_head."))
        assert n == count, (name, n)
        assert {k for k in model.state_dict() if k.startswith("online_head.")} == \
            {"online_head.weight", "online_head.bias"}


def test_fixed_sincos_position_embeddings():
    m = tiny()
    ref = torch.from_numpy(get_2d_sincos_pos_embed(192, 8, cls_token=True)).float()
    assert torch.allclose(m.pos_embed[0], ref)
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    assert torch.all(m.pos_embed[0, 0] == 0)


def test_forward_outputs_and_mask_ratio_zero():
    torch.manual_seed(0)
    m = tiny()
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask, feats, logits = m(imgs, 0.75)
    assert pred.shape == (3, 64, 48) and mask.shape == (3, 64) and feats.shape == (3, 192)
    assert logits.shape == (3, 10) and loss.ndim == 0 and torch.isfinite(loss)
    assert mask.sum().item() == 3 * 48
    loss0, _, mask0, feats0, _ = m(imgs, 0.0)
    assert mask0.sum() == 0 and loss0.item() == 0.0 and torch.isfinite(feats0).all()
    # full-image features are the ones the online probe uses
    latent, _, _ = m.forward_encoder(imgs, 0.0)
    assert torch.allclose(m.online_head(m.pooled_features(latent)), m.online_predict(imgs), atol=1e-5)


def test_loss_only_on_masked_patches_and_norm_pix():
    torch.manual_seed(0)
    m = tiny(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    loss, pred, mask, _, _ = m(imgs, 0.75, noise)
    target = m.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(-1)
    assert torch.allclose(loss, (per_patch * mask).sum() / mask.sum(), atol=1e-6)


def test_online_head_gradient_never_reaches_encoder():
    torch.manual_seed(0)
    m = tiny()
    _, _, _, _, logits = m(torch.randn(4, 3, 32, 32), 0.75)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert m.online_head.weight.grad is not None and m.online_head.weight.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        if not name.startswith("online_head.") and p.requires_grad:
            assert p.grad is None or p.grad.abs().sum() == 0, name


def test_registry_overrides_and_bad_patch_size():
    m = models_mae.mae_vit_small_patch16(img_size=64, patch_size=8)
    assert m.patch_embed.num_patches == 64 and m.pos_embed.shape == (1, 65, 384)
    try:
        models_mae.mae_vit_tiny_patch16(img_size=30, patch_size=4)
    except ValueError as e:
        assert "not divisible" in str(e)
    else:
        raise AssertionError("expected ValueError")
