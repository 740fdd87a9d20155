"""Real models, built from configs (no weights downloaded), against the per-example loop.

torchvision, transformers and peft are test extras; a missing one skips its tests unless
INDIGRAD_REQUIRE_MODELS=1 (as in CI), where it fails.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_sums_to_batch_gradient
from torch import nn

import indigrad


def _require(name):
    if os.environ.get("INDIGRAD_REQUIRE_MODELS"):
        return __import__(name)
    try:
        return __import__(name)
    except Exception as err:  # missing, or built for another torch (torchvision)
        pytest.skip(f"{name} cannot be imported: {err}")


def _randomise_running_stats(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _nothing_left(model, before):
    assert [
        (k, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for k, m in model.named_modules()
    ] == before


def _hooks(model):
    return [
        (k, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for k, m in model.named_modules()
    ]


def _check(model, loss_fn, *batch):
    before = _hooks(model)
    indigrad.testing.check(model, loss_fn, *batch)
    assert _hooks(model) == before


def _ce(model):
    return lambda x, y: F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("norm", ["groupnorm", "batchnorm_eval"])
def test_resnet18(norm):
    tv = _require("torchvision")
    torch.manual_seed(0)
    if norm == "groupnorm":
        model = tv.models.resnet18(num_classes=5, norm_layer=lambda c: nn.GroupNorm(4, c))
    else:
        model = tv.models.resnet18(num_classes=5)
        _randomise_running_stats(model)
        model.eval()
    model = model.double()
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3, 4])
    _check(model, _ce(model), x, y)


def test_vision_transformer(no_rerun):
    """Its class token (the model's own) and position embedding (the encoder's) are read
    from the graph, as is its self-attention."""
    tv = _require("torchvision")
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(
        image_size=16,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        num_classes=3,
    ).double()
    x, y = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 2, 1])
    _check(model.eval(), _ce(model), x, y)


def _convnext(stochastic_depth_prob):
    tv = _require("torchvision")
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    settings = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]
    return ConvNeXt(settings, stochastic_depth_prob, num_classes=3).double(), tv


@pytest.mark.parametrize("n", [3, 4])
def test_convnext(n, no_rerun):
    """Depthwise 7×7 convs, torchvision's LayerNorm2d and each block's layer scale (a raw
    parameter, read from the graph): nothing is re-run by the generic rule. With n = 4 the
    second stage's 4×4 maps have as many rows and columns as the batch: which is the batch
    is traced through the block's permutation back to its last Linear."""
    model, _ = _convnext(0.0)
    x, y = torch.randn(n, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 2, 1, 1][:n])
    _check(model, _ce(model), x, y)


@pytest.mark.parametrize("n", [4, 5, 8])
def test_convnext_with_stochastic_depth_in_training_mode(n, no_rerun):
    """Stochastic depth drops blocks at random, which a re-run could not reproduce; at
    n = 4 and 8 the feature maps are as wide as the batch in one stage."""
    model, _ = _convnext(0.5)
    model.train()
    x, y = torch.randn(n, 3, 32, 32, dtype=torch.float64), torch.arange(n) % 3
    assert_sums_to_batch_gradient(model, _ce(model), x, y)


def _swin(v2, stages=2):
    _require("torchvision")
    from torchvision.models import swin_transformer as swin

    block = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2}
    torch.manual_seed(0)
    return swin.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=8,
        depths=[1] * stages if stages > 1 else [2],  # torchvision needs two blocks
        num_heads=[2] * stages,
        window_size=[2, 2],
        stochastic_depth_prob=0.0,
        num_classes=3,
        **(block if v2 else {}),
    ).double()


def test_swin_transformer():
    """Swin's attention applies its qkv and proj children's weights with F.linear and
    indexes its relative position bias table: it takes them all, and the generic rule
    re-runs it (for the table anyway, so without a warning)."""
    model = _swin(v2=False)
    x, y = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 2])
    _check(model, _ce(model), x, y)


@pytest.mark.parametrize("stages", [1, 2])
def test_swin_transformer_v2(stages):
    """Swin V2's attention computes its position bias with an MLP on a coordinate table
    (batch-free) and adds it to scores whose batch is merged with the windows: the
    attention takes the MLP's parameters and is re-run, with a warning. (With two stages
    the second has one window per example: its MLP's gradients are read where the bias
    meets the batch.)"""
    model = _swin(v2=True, stages=stages)
    x, y = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 2, 1])
    with pytest.warns(UserWarning, match=r"cpb_mlp.*merged|re-run for each example"):
        _check(model, _ce(model), x, y)


def _gpt2(**kw):
    transformers = _require("transformers")
    config = transformers.GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=8,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **kw,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double()


def _lm_losses(model):
    def losses(ids):
        logits = model(input_ids=ids).logits  # (n, T, V)
        return F.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        )  # (n, T - 1): token losses, summed per sequence

    return losses


def test_gpt2_tied_embeddings():
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 50, (3, 7))
    _check(model, _lm_losses(model), ids)


def test_gpt2_with_gradient_checkpointing():
    """Each block's forward is recomputed in the backward; what the rules read from the
    graph before it (LayerNorm statistics) comes from the recomputation."""
    model = _gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing is only active in training mode
    ids = torch.randint(0, 50, (3, 7))
    _check(model, _lm_losses(model), ids)


def _bart(cls, vocab_size, ffn_dim, decoder_layers=1, **kw):
    """A tiny BART of class ``cls`` (d = 8, two heads, one encoder layer), in eval mode."""
    transformers = _require("transformers")
    config = transformers.BartConfig(
        vocab_size=vocab_size,
        d_model=8,
        encoder_layers=1,
        decoder_layers=decoder_layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        max_position_embeddings=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        **kw,
    )
    torch.manual_seed(0)
    return getattr(transformers, cls)(config).double().eval()


def test_bart_sequence_classification():
    """BART's decoder hands its learned positions the position ids (T,) and gets (1, T, d)
    back, shared by the batch (the generic rule, run once); its scaled token embeddings
    override ``forward`` and are read from the graph as lookups."""
    model = _bart("BartForSequenceClassification", vocab_size=40, ffn_dim=16, num_labels=3)
    ids = torch.randint(3, 40, (3, 6))
    ids[:, -1] = model.config.eos_token_id  # the classification head reads the last eos

    def losses(ids, y):
        return F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")

    _check(model, losses, ids, torch.tensor([0, 2, 1]))


@pytest.mark.parametrize("n, Td", [(3, 4), (3, 3)])
def test_bart_with_labels(n, Td):
    """Given labels, BART shifts them into its decoder's ids inside the model: integer ids
    whose first dimension is followed to the losses'. With Td = n every activation of the
    decoder has two dimensions of n entries; the follow goes through its attention
    (scaled_dot_product_attention's node) to the losses (it was refused)."""
    model = _bart("BartForConditionalGeneration", vocab_size=20, ffn_dim=8, decoder_layers=2)
    ids, labels = torch.randint(3, 20, (n, 5)), torch.randint(3, 20, (n, Td))

    def losses(ids, labels):
        logits = model(input_ids=ids, labels=labels).logits  # (n, Td, V)
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(1)

    _check(model, losses, ids, labels)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_t5_relative_position_bias(attention, no_rerun):
    """T5's relative position bias is an embedding of (T, T) buckets without the batch,
    permuted to heads first: its per-example gradients are read where it meets the batch
    (sdpa: a ``where`` with the padding mask; eager: an add to the scores)."""
    transformers = _require("transformers")
    config = transformers.T5Config(
        vocab_size=40,
        d_model=8,
        d_kv=4,
        d_ff=16,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).double().eval()
    ids, labels = torch.randint(3, 40, (3, 7)), torch.randint(3, 40, (3, 5))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, -2:] = 0  # padding: the mask differs between examples

    def losses(ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=labels).logits
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (n, 5)

    _check(model, losses, ids, mask, labels)
    # as many tokens as examples: the (T, T) buckets could be a batch; not followed to it
    ids, mask = ids[:, :3], mask[:, :3]
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="cannot follow"):
        cap.norms(losses(ids, mask, labels))


@pytest.mark.parametrize("shared", [False, True])
def test_beit_relative_position_bias(shared):
    """BEiT's relative position bias module takes no tensor input: its output is shared
    by all examples and read where it meets the attention scores."""
    transformers = _require("transformers")
    config = transformers.BeitConfig(
        image_size=8,
        patch_size=4,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
        use_relative_position_bias=not shared,
        use_shared_relative_position_bias=shared,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BeitForImageClassification(config).double().eval()
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 2, 1])
    _check(model, _vit_losses(model), x, y)


def _hf_vit(dropout):
    transformers = _require("transformers")
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
        hidden_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).double()


def _vit_losses(model):
    return lambda x, y: F.cross_entropy(model(pixel_values=x).logits, y, reduction="none")


def test_hugging_face_vit(no_rerun):
    """Its embeddings' class token and position embeddings are read from the graph."""
    model = _hf_vit(0.0).eval()
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 2, 1])
    _check(model, _vit_losses(model), x, y)


def test_hugging_face_vit_with_dropout_in_training_mode(no_rerun):
    """Dropout right after the embeddings' position embedding, which a re-run could not
    reproduce."""
    model = _hf_vit(0.2).train()
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 2, 1])
    assert_sums_to_batch_gradient(model, _vit_losses(model), x, y)


# n = 3 against T = 6; n = T; n = the hidden size. The default token type ids are a buffer
# expanded to the batch, questioned as integers made inside the model: with another
# dimension of n entries they were refused, although they meet the word embeddings of the
# model's own ids in an add.
@pytest.mark.parametrize("n, T", [(3, 6), (6, 6), (8, 5)])
def test_bert_sequence_classification(n, T):
    transformers = _require("transformers")
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double()
    ids, mask = torch.randint(0, 40, (n, T)), torch.ones(n, T, dtype=torch.long)
    mask[1, 4:] = 0
    y = torch.arange(n) % 3

    def losses(ids, mask, y):
        return F.cross_entropy(
            model(input_ids=ids, attention_mask=mask).logits, y, reduction="none"
        )

    _check(model, losses, ids, mask, y)


def test_peft_lora_on_gpt2():
    peft = _require("peft")
    model = peft.get_peft_model(
        _gpt2(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    ).double()
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k in trainable)
    ids = torch.randint(0, 50, (3, 7))
    # make lora_B non-zero so that every adapter parameter gets a gradient
    for k, p in model.named_parameters():
        if "lora_B" in k:
            torch.nn.init.normal_(p, std=0.1)
    with indigrad.capture(model) as cap:
        grads = cap.grads(_lm_losses(model)(ids))
    assert list(grads) == trainable
    _check(model, _lm_losses(model), ids)
