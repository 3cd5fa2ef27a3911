"""The Frozen captioner: training moves only the vision side and leaves the LM bit-identical, with our GPT-2 and
transformers' alike; the loss starts at the last prefix position and skips padding; generation continues the prefix."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import minivlm.decoding as decoding
from conftest import hf_gpt2
from minivlm.captioner import CAPTIONER_PRESETS, Captioner, CaptionerConfig
from minivlm.cnn import SmallCNN
from minivlm.data.captions import CaptionCollator, ShapesCaptions
from minivlm.data.shapes import ShapesWorld
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.prefix import LinearMapper, block_input_scales, build_mapper
from minivlm.tokenizer import train_tokenizer

TINY = CAPTIONER_PRESETS["tiny"]  # tiny CNN, linear mapper, P = 2
P = TINY.prefix_length
BACKENDS = ["minivlm", "transformers"]


@pytest.fixture(scope="module")
def lms():
    """The same random tiny GPT-2 (V = 128, context 64, dropout 0.1) as ours and as transformers' GPT2LMHeadModel.

    Weights are spread (std 0.3) so the LM's predictions vary with their input, and a prefix can steer them.
    """
    torch.manual_seed(0)
    hf = hf_gpt2("tiny", std=0.3)
    return {"minivlm": GPT2.from_hf(hf), "transformers": hf}


def captioner(lm, config: CaptionerConfig = TINY, seed: int = 0) -> Captioner:
    """A captioner around a private copy of `lm`; the same seed gives the same vision side."""
    torch.manual_seed(seed)
    return Captioner.from_config(copy.deepcopy(lm), config)


def batch(b: int = 4, t: int = 6, v: int = 128, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random images and right-padded token rows of lengths t, t-1, ..., as CaptionCollator makes them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([max(1, t - i) for i in range(b)])
    mask = (torch.arange(t) < lengths[:, None]).long()  # (B, T)
    ids = torch.randint(2, v, (b, t), generator=g).masked_fill(mask == 0, 1)
    return {"images": torch.rand(b, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100)}  # fmt: skip


def loss_of(model: Captioner, data: dict) -> torch.Tensor:
    return model(data["images"], data["input_ids"], data["attention_mask"], data["labels"]).loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_moves_only_the_vision_side(lms, backend):
    """THE property of Frozen: after AdamW steps every LM weight is bit-identical and never had a gradient."""
    model = captioner(lms[backend]).train()
    assert model.encoder.training and not model.lm.training  # train() leaves the LM in eval mode: no dropout
    lm_before = {name: t.clone() for name, t in model.lm.state_dict().items()}
    vision_before = [p.clone() for p in model.encoder.parameters()]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in [*model.encoder.parameters(), *model.mapper.parameters()]}
    data = batch()
    losses = []
    for _ in range(5):
        loss = loss_of(model, data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, t in model.lm.state_dict().items():
        assert torch.equal(t, lm_before[name]), f"the frozen LM's {name} changed"
    assert all(p.grad is None and not p.requires_grad for p in model.lm.parameters())
    assert not model.lm.training
    assert any(not torch.equal(a, b) for a, b in zip(model.encoder.parameters(), vision_before))


def test_both_backends_give_the_same_loss(lms):
    ours = captioner(lms["minivlm"]).eval()
    vision = copy.deepcopy(ours.encoder), copy.deepcopy(ours.mapper)
    theirs = Captioner(*vision, copy.deepcopy(lms["transformers"])).eval()
    data = batch()
    with torch.no_grad():
        a = ours(data["images"], data["input_ids"], data["attention_mask"], data["labels"])
        b = theirs(data["images"], data["input_ids"], data["attention_mask"], data["labels"])
    real = torch.cat([torch.ones(4, P, dtype=torch.bool), data["attention_mask"].bool()], dim=1)
    assert_close(a.logits[real], b.logits[real], atol=1e-5, rtol=0)
    assert_close(a.loss, b.loss, atol=1e-5, rtol=0)


def test_loss_is_next_token_cross_entropy_over_the_caption_only(lms):
    """Position P-1+t predicts caption token t: the last prefix vector predicts the first token, padding is skipped."""
    model = captioner(lms["minivlm"]).eval()
    data = batch()
    with torch.no_grad():
        out = model(data["images"], data["input_ids"], data["attention_mask"], data["labels"])
    t = data["input_ids"].shape[1]
    assert out.logits.shape == (4, P + t, 128)
    predictions = out.logits[:, P - 1 : P - 1 + t]  # (B, T, V): the scores for caption tokens 0 .. T-1
    real = data["attention_mask"].bool()
    assert_close(out.loss, F.cross_entropy(predictions[real], data["input_ids"][real]))

    first_only = data["labels"].clone()
    first_only[:, 1:] = -100
    with torch.no_grad():
        loss = model(data["images"], data["input_ids"], data["attention_mask"], first_only).loss
    assert_close(loss, F.cross_entropy(out.logits[:, P - 1], data["input_ids"][:, 0]))


def test_padding_tokens_change_nothing(lms):
    model = captioner(lms["minivlm"]).eval()
    data = batch()
    other = dict(data, input_ids=data["input_ids"].masked_fill(data["attention_mask"] == 0, 77))
    with torch.no_grad():
        a, b = model(**data), model(**other)
    real = torch.cat([torch.ones(4, P, dtype=torch.bool), data["attention_mask"].bool()], dim=1)
    assert_close(a.logits[real], b.logits[real])
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_length_groups_give_the_same_loss_and_gradients(lms, backend):
    """Grouping captions by length only skips padding: the loss and every vision gradient are as in one batch."""
    data = batch(b=6, t=7)
    data = {k: v[torch.tensor([3, 0, 5, 1, 4, 2])] for k, v in data.items()}  # lengths 4, 7, 2, 6, 3, 5: unsorted
    full = captioner(lms[backend])
    out = full(**data)
    out.loss.backward()
    for groups in (1, 2, 4, 6):
        grouped = captioner(lms[backend])  # the same vision side (same seed)
        g = grouped(**data, length_groups=groups)
        assert g.logits is None
        assert_close(g.prefix, out.prefix)
        assert_close(g.loss, out.loss, atol=1e-6, rtol=1e-6)
        g.loss.backward()
        for (name, a), b in zip(full.named_parameters(), grouped.parameters()):
            if a.requires_grad:
                assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="needs labels"):
        full(data["images"], data["input_ids"], data["attention_mask"], length_groups=2)


def test_embed_puts_the_prefix_before_the_tokens(lms):
    model = captioner(lms["transformers"]).eval()
    data = batch()
    with torch.no_grad():
        embeds, mask = model.embed(data["images"], data["input_ids"], data["attention_mask"])
        prefix = model.prefix(data["images"])
    assert prefix.shape == (4, P, 32) and embeds.shape == (4, P + 6, 32)
    assert_close(embeds[:, :P], prefix)
    assert torch.equal(embeds[:, P:], model.lm.get_input_embeddings()(data["input_ids"]))
    assert torch.equal(mask, torch.cat([torch.ones(4, P, dtype=torch.long), data["attention_mask"]], dim=1))


def test_train_lm_is_the_control(lms):
    model = captioner(lms["minivlm"], replace(TINY, train_lm=True)).train()
    assert not model.lm.training
    lm_params = list(model.lm.parameters())
    assert all(p.requires_grad for p in lm_params)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters()}
    before = [p.clone() for p in lm_params]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    loss_of(model, batch()).backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(lm_params, before))


def test_bad_inputs_are_errors(lms):
    model = captioner(lms["minivlm"])
    data = batch(b=2)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\), got \(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32), data["input_ids"])
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\), got \(3, 32, 32\)"):
        model(torch.rand(3, 32, 32), data["input_ids"])
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\), got \(2, 3, 64, 64\)"):
        model(torch.rand(2, 3, 64, 64), data["input_ids"])
    with pytest.raises(ValueError, match="got 3 images but 2 rows of input_ids"):
        model(torch.rand(3, 3, 32, 32), data["input_ids"])
    too_long = torch.ones(2, 64 - P + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=f"{P} tokens and {64 - P + 1} text tokens make 65 positions, more than "
                                         "the language model's context of 64"):  # fmt: skip
        model(data["images"], too_long)
    with pytest.raises(ValueError, match="the mapper writes vectors of width 16, the LM's embeddings have width 32"):
        Captioner(model.encoder, LinearMapper(model.encoder.out_dim, 16, P, 1.0), lms["minivlm"])
    with pytest.raises(ValueError, match="unknown mapper kind 'rnn'"):
        CaptionerConfig(mapper="rnn")
    with pytest.raises(ValueError, match="unknown captioner preset 'huge'"):
        Captioner.from_config(lms["minivlm"], "huge")


def test_prompt_embeds_continue_as_training_reads(lms):
    """Greedy decoding by hand from prompt_embeds, then the same tokens teacher-forced through forward: same argmax."""
    model = captioner(lms["minivlm"]).eval()
    images = batch(b=2)["images"]
    wte = model.lm.get_input_embeddings()
    with torch.no_grad():
        embeds, mask = model.prompt_embeds(images)
        tokens = []
        for _ in range(5):
            token = model.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].argmax(-1)  # (B,)
            tokens.append(token)
            embeds = torch.cat([embeds, wte(token)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        ids = torch.stack(tokens, dim=1)  # (B, 5)
        forced = model(images, ids).logits[:, P - 1 : -1].argmax(-1)
    assert torch.equal(forced, ids)
    prompt = torch.tensor([5, 6, 7])
    with torch.no_grad():
        a = model.prompt_embeds(images, prompt)
        b = model.embed(images, prompt.expand(2, 3))
    assert_close(a[0], b[0]) and torch.equal(a[1], b[1])


def test_generate_captions_with_the_decoding_module():
    if not hasattr(decoding, "generate"):
        pytest.skip("minivlm.decoding.generate does not exist yet")
    world = ShapesWorld("train", image_size=32, seed=1, length=32)
    tokenizer = train_tokenizer([world.caption(i) for i in range(len(world))], vocab_size=300)
    torch.manual_seed(0)
    lm = GPT2(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    model = Captioner.from_config(lm, TINY).train()
    images = torch.rand(2, 3, 32, 32)
    texts = model.generate(images, tokenizer, max_new_tokens=6)
    assert model.training  # generate ran in eval mode and restored the mode
    embeds, mask = model.prompt_embeds(images)
    ids = decoding.generate(lm, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6,
                            eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    eot = tokenizer.eos_token_id
    expected = [tokenizer.decode(row[: row.index(eot)] if eot in row else row) for row in ids.tolist()]
    assert texts == expected and all(isinstance(t, str) for t in texts)
    assert len(model.generate(images, tokenizer, max_new_tokens=3, prompt="a small", strategy="beam", num_beams=2)) == 2


def test_a_frozen_lm_learns_to_name_each_images_colour():
    """End to end through the frozen LM: four shapes-world images, each captioned by its first object's colour.

    A *random* frozen LM cannot be steered to write a whole caption (its next token depends on the last
    token, not on the prefix), so only the first word is scored, which the last prefix vector predicts.
    """
    world = ShapesWorld("train", image_size=32, seed=0, length=4)
    dataset = ShapesCaptions(world)
    tokenizer = train_tokenizer([world.caption(i) for i in range(len(world))], vocab_size=300)
    items = [(dataset[i][0], dataset.captions[i].split()[2]) for i in range(4)]  # "a large red ..." -> "red"
    data = CaptionCollator(tokenizer, 8)(items)
    data["labels"][:, 1:] = -100  # only the colour's first token is scored
    assert len(set(data["input_ids"][:, 0].tolist())) >= 2  # different images, different answers
    torch.manual_seed(0)
    lm = GPT2(GPT2Config(vocab_size=300, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)  # as conftest.hf_gpt2: predictions that vary with the input
    model = Captioner.from_config(lm, TINY).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = model(data["images"], data["input_ids"], data["attention_mask"], data["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 1.0 < 4.0 < losses[0]
    with torch.no_grad():
        first = model(data["images"], data["input_ids"][:, :1]).logits[:, P - 1].argmax(-1)
    assert torch.equal(first, data["input_ids"][:, 0])
    assert isinstance(model.encoder, SmallCNN)


# ---- a prefix read at every block (CaptionerConfig.prefix_depth) ----------------------------------

DEEP = replace(TINY, prefix_depth=2)  # the tiny LM has 2 blocks: the input and block 1 both read the image


def by_hand(model: Captioner, data: dict) -> torch.Tensor:
    """The deep captioner's logits (B, P + T, V) computed without hooks: block k > 0 reads slot k at the prefix."""
    lm, k = model.lm.lm, model.prefix_depth  # our GPT2 inside the DeepPrefixLM
    prefix = model.mapper(model.encoder(data["images"]))  # (B, K * P, D)
    sets = prefix.unflatten(1, (k, P))  # (B, K, P, D)
    x = torch.cat([sets[:, 0], lm.transformer.wte(data["input_ids"])], dim=1)
    x = x + lm.transformer.wpe(torch.arange(x.shape[1]))
    for i, block in enumerate(lm.transformer.h):
        if 0 < i < k:
            x = torch.cat([sets[:, i], x[:, P:]], dim=1)  # the image's own vectors, in place of block i-1's
        x, _ = block(x, None, None, i, False)
    return lm.lm_head(lm.transformer.ln_f(x))


def test_a_deep_prefix_is_read_by_every_block_it_names(lms):
    """Block k reads the image's k-th set of P vectors at the prefix positions; text reads on as before."""
    model = captioner(lms["minivlm"], DEEP).eval()
    data = batch()
    with torch.no_grad():
        out = model(data["images"], data["input_ids"])
        assert out.prefix.shape == (4, P, 2 * 32)  # each position's K slots side by side
        assert_close(out.logits, by_hand(model, data), atol=1e-5, rtol=0)
        shallow = Captioner(model.encoder, model.mapper, copy.deepcopy(lms["minivlm"]))  # the same 2P vectors, as
        # an input prefix of 2P: a different model, so the logits differ
        assert not torch.allclose(shallow(data["images"], data["input_ids"]).logits[:, 2 * P :], out.logits[:, P:])
    scales = model.mapper.target_scale[:, 0]  # (K * P,): each set has the length its block reads
    assert_close(scales, torch.tensor(block_input_scales(model.lm.lm, 2)).repeat_interleave(P))
    lengths = model.prefix(data["images"]).unflatten(-1, (2, 32)).norm(dim=-1)  # (B, P, K)
    assert_close(lengths, scales.view(2, P).T.expand(4, P, 2), rtol=1e-4, atol=0)


def test_both_backends_read_a_deep_prefix_alike(lms):
    ours = captioner(lms["minivlm"], DEEP).eval()
    theirs = Captioner(copy.deepcopy(ours.encoder), copy.deepcopy(ours.mapper), copy.deepcopy(lms["transformers"]),
                       prefix_depth=2).eval()  # fmt: skip
    data = batch()
    with torch.no_grad():
        a = ours(data["images"], data["input_ids"], data["attention_mask"], data["labels"])
        b = theirs(data["images"], data["input_ids"], data["attention_mask"], data["labels"])
    real = torch.cat([torch.ones(4, P, dtype=torch.bool), data["attention_mask"].bool()], dim=1)
    assert_close(a.logits[real], b.logits[real], atol=1e-5, rtol=0)
    assert_close(a.loss, b.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prefix_read_by_every_block_is_keys_and_values_the_lm_continues_from(lms, backend):
    """prefix_cache holds what the blocks keep of prefix positions 0 .. P-2; the LM continues from it as from them."""
    config = replace(DEEP, prefix_length=4)  # both blocks of the tiny LM read 4 vectors
    model = captioner(lms[backend], config).eval()
    data = batch(b=3, t=5)
    with torch.no_grad():
        embeds, _, _ = model._embed(data["images"], data["input_ids"], data["attention_mask"])  # (B, 4 + T, 2D)
        full = model._logits(embeds)  # (B, 4 + T, V)
        cache = model.lm.prefix_cache(embeds[:, :3])
        assert cache.get_seq_length() == 3
        assert_close(model._logits(embeds[:, 3:], cache), full[:, 3:], atol=1e-5, rtol=0)
        wrong = model.lm.prefix_cache(embeds[:, :3].flip(1))  # the prefix's vectors in another order
        assert not torch.allclose(model._logits(embeds[:, 3:], wrong), full[:, 3:], atol=1e-3)
    with pytest.raises(ValueError, match="shape"):
        model.lm.prefix_cache(embeds[:, :3, :32])
    three = GPT2(GPT2Config.from_preset("tiny", n_layer=3))  # a prefix read by 2 of its 3 blocks: block 2 computes
    shallow = captioner(three, config)  # the prefix positions from block 1's output, so they are not a cache
    assert not shallow.lm.reads_every_block
    with pytest.raises(ValueError, match="read by every block"):
        shallow.lm.prefix_cache(embeds[:, :3])
    data = batch(b=6, t=7)
    assert_close(shallow(**data, length_groups=3).loss, shallow(**data).loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deep_prefix_trains_only_the_vision_side_and_groups_alike(lms, backend):
    """The LM stays bit-identical and gradient-free; grouping captions by length gives the same gradients."""
    data = batch(b=6, t=7)
    model = captioner(lms[backend], DEEP).train()
    assert not model.lm.training
    before = {name: t.clone() for name, t in model.lm.state_dict().items()}
    out = model(**data)
    out.loss.backward()
    grouped = captioner(lms[backend], DEEP).train()
    g = grouped(**data, length_groups=3)
    assert_close(g.loss, out.loss, atol=1e-6, rtol=1e-6)
    g.loss.backward()
    for (name, a), b in zip(model.named_parameters(), grouped.parameters()):
        if a.requires_grad:
            assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
    per_set = model.mapper.linear.weight.grad.unflatten(0, (2, -1)).abs().sum(dim=(1, 2))  # (K,)
    assert (per_set > 0).all()  # the loss reaches the input's set and block 1's
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for p in [*model.encoder.parameters(), *model.mapper.parameters()]}  # fmt: skip
    optimizer.step()
    for name, t in model.lm.state_dict().items():
        assert torch.equal(t, before[name]), f"the frozen LM's {name} changed"
    assert all(p.grad is None and not p.requires_grad for p in model.lm.parameters())


def test_a_deep_prefix_decodes_the_same_every_way():
    """Cached and uncached greedy agree, beam width 1 is greedy, a batch is its images one by one, with a prompt too."""
    world = ShapesWorld("train", image_size=32, seed=1, length=32)
    tokenizer = train_tokenizer([world.caption(i) for i in range(len(world))], vocab_size=300)
    torch.manual_seed(0)
    lm = GPT2(GPT2Config(vocab_size=300, n_positions=48, n_embd=32, n_layer=3, n_head=2))
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)  # predictions that vary with the input (and so with the prefix)
    model = Captioner.from_config(lm, replace(TINY, prefix_depth=3)).eval()
    images = torch.rand(3, 3, 32, 32)
    for prompt in (None, "a small"):
        greedy = model.generate(images, tokenizer, max_new_tokens=8, prompt=prompt)
        assert greedy == model.generate(images, tokenizer, max_new_tokens=8, prompt=prompt, use_cache=False)
        assert greedy == model.generate(images, tokenizer, max_new_tokens=8, prompt=prompt, strategy="beam",
                                        num_beams=1)  # fmt: skip
        assert greedy == [model.generate(images[i : i + 1], tokenizer, max_new_tokens=8, prompt=prompt)[0]
                          for i in range(3)]  # fmt: skip
    assert len(set(model.generate(images, tokenizer, max_new_tokens=8))) > 1  # the images are read


def test_a_deep_prefix_refuses_what_cannot_work(lms):
    with pytest.raises(ValueError, match="prefix_depth must be an int of at least 1"):
        CaptionerConfig(prefix_depth=0)
    with pytest.raises(ValueError, match=r"read by 1 to 2 blocks of this LM, got depth=3"):
        Captioner.from_config(lms["minivlm"], replace(TINY, prefix_depth=3))
    model = captioner(lms["minivlm"])
    with pytest.raises(ValueError, match="needs 2 sets of P vectors; the mapper writes 3, not a multiple of 2"):
        Captioner(model.encoder, LinearMapper(model.encoder.out_dim, 32, 3, 1.0), lms["minivlm"], prefix_depth=2)
    deep = captioner(lms["minivlm"], DEEP)
    with pytest.raises(ValueError, match=r"expected inputs_embeds of shape \(B, T, 2 \* 32\)"):
        deep.lm(inputs_embeds=torch.zeros(1, 3, 32))
    assert deep.language_model is deep.lm.lm and model.language_model is model.lm  # the LM itself, either way
    with pytest.raises(TypeError, match="already reads a prefix at several blocks; pass the LM inside it"):
        Captioner.from_config(deep.lm, DEEP)  # a DeepPrefixLM inside a DeepPrefixLM
    with pytest.raises(ValueError, match="target_scale has 3 lengths for 4 prefix vectors"):
        LinearMapper(8, 32, 4, [1.0, 2.0, 3.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grid_prefix_is_a_vector_per_cell_read_by_every_block_and_trains_only_the_vision_side(lms, backend):
    """The cpu preset's mapper on the tiny CNN: 16 cells, so P = 16 per set; both sets learn, the LM stays frozen."""
    config = replace(TINY, mapper="grid", prefix_length=16, prefix_depth=2)
    model = captioner(lms[backend], config).train()
    assert (model.mapper.cells, model.mapper.sets, model.prefix_length) == (16, 2, 16)
    before = {name: t.clone() for name, t in model.lm.state_dict().items()}
    data = batch(b=5, t=6)
    out = model(**data)
    assert out.prefix.shape == (5, 16, 2 * 32)  # P vectors, each the input's and block 1's, side by side
    out.loss.backward()
    per_set = model.mapper.linear.weight.grad.unflatten(0, (2, -1)).abs().sum(dim=(1, 2))  # (K,)
    assert (per_set > 0).all()
    torch.optim.AdamW(model.trainable_parameters(), lr=1e-2).step()
    for name, t in model.lm.state_dict().items():
        assert torch.equal(t, before[name]), f"the frozen LM's {name} changed"
    with pytest.raises(ValueError, match="one prefix vector per cell of the encoder: prefix_length must be its 16 "
                                         "cells, got 4"):  # fmt: skip
        CaptionerConfig(cnn_preset="tiny", mapper="grid", prefix_length=4)
    assert CaptionerConfig(encoder="resnet18", mapper="grid", prefix_length=1).prefix_length == 1  # its global pool


@pytest.mark.parametrize("depth", [1, 2])
def test_a_word_view_reads_the_features_without_changing_them_and_is_read_as_text(lms, depth):
    """The word view's head learns from its own loss alone; its vectors go to the LM's input, deeper slots zero."""
    config = replace(TINY, prefix_depth=depth, word_view=3)
    model = captioner(lms["minivlm"], config).train()
    assert model.word_view == 3 and captioner(lms["minivlm"]).word_view == 0
    data = batch(b=4, t=6)
    out = model(**data)
    assert out.words.shape == (4, 3, 32)
    out.words.square().sum().backward()  # a loss of the word view alone
    assert all(p.grad is None for p in model.encoder.parameters())  # it reaches no encoder weight
    assert all(p.grad is not None for p in model.word_mapper.parameters())
    model.zero_grad()
    grouped = model(**data, length_groups=2)
    assert_close(grouped.words, out.words)
    words = model.words(data["images"])  # (B, W, K * D): what a few-shot prompt shows
    assert words.shape == (4, 3, depth * 32)
    assert_close(words[..., :32], out.words)
    assert (words[..., 32:] == 0).all()  # deeper slots: zeros, so the blocks compute them as for a token
    torch.manual_seed(0)
    same = Captioner.from_config(copy.deepcopy(lms["minivlm"]), replace(config, word_view=0))
    torch.manual_seed(0)
    with_view = Captioner.from_config(copy.deepcopy(lms["minivlm"]), config)
    for name, t in same.state_dict().items():  # the head is made last: the rest starts as without it
        assert torch.equal(t, with_view.state_dict()[name]), name
    with pytest.raises(ValueError, match="no word view"):
        same.words(data["images"])
    with pytest.raises(ValueError, match="word_view must be an int >= 0"):
        CaptionerConfig(word_view=-1)
    f = model.encoder.out_dim
    with pytest.raises(ValueError, match=f"the word view's head reads {f} features into vectors of width 16; the "
                                         f"encoder gives {f} and the LM's embeddings have width 32"):  # fmt: skip
        Captioner(model.encoder, model.mapper, lms["minivlm"], prefix_depth=depth,
                  word_mapper=build_mapper("mlp", f, 16, 3, None))  # fmt: skip
    with pytest.raises(ValueError, match=f"the encoder gives {f} features, the mapper expects {f + 1}"):
        Captioner(model.encoder, build_mapper("linear", f + 1, 32, 2 * depth, 1.0), lms["minivlm"], prefix_depth=depth)
