"""A tiny checkpoint that speaks Gemma 4's chat protocol: a byte-level BPE whose control tokens sit at their real
ids (46-52, 98, 100/101, 105/106; EOS [1, 106, 50]), dgemma's Gemma-4-shaped chat template, and `ScriptedModel`,
whose logits force a scripted reply, so a tool call or a thought really comes out of the engine."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tiny import corpus_lines, random_model, tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dgemma.config import FULL, GenerationSettings
from dgemma.export import CHAT_TEMPLATE, save_model
from dgemma.generate import Pipeline
from dgemma.model import DiffusionGemma
from dgemma.tokenizer import Tokenizer as DTokenizer

CONTROL = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
EOS_IDS = (1, 106, 50)
CHAT_TEXT = [
    "thought call: response: declaration: get_weather city Paris London weather is sunny and 21 degrees today",
    '{"city": "Paris", "unit": "celsius"} model user system The answer is 42. Let me think about it.',
]


def gemma4_tokenizer(vocab_size: int = 640) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [CONTROL.get(i, f"<unused{i}>") for i in range(max(CONTROL) + 1)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(200) + CHAT_TEXT * 20, trainer=trainer)
    assert all(tok.token_to_id(t) == i for i, t in CONTROL.items())
    return tok


def gemma4_checkpoint(path: Path, canvas_length: int = 16, seed: int = 0, **settings) -> Path:
    tok = gemma4_tokenizer()
    config = tiny_config(canvas_length=canvas_length, vocab_size=tok.get_vocab_size(), max_position_embeddings=1024)
    settings = {"max_new_tokens": 256, "steps": 6, "eos_token_ids": EOS_IDS, "pad_token_id": 0, **settings}
    out = save_model(random_model(config, seed), path, GenerationSettings(**settings), tokenizer=tok)
    shutil.copy(CHAT_TEMPLATE, out / "chat_template.jinja")
    return out


class ScriptedModel(DiffusionGemma):
    """A real tiny model whose denoising logits are replaced by a script: `script(context_text) -> reply text`.

    The encoder runs as usual but also writes each token id into channel 0 of the first full-attention layer's
    keys, so the context of any cache (cloned, stacked or reused) can be read back. The reply starts after the
    last `<|turn>model\\n` or `<tool_response|>`; the logits put +30 on the reply's next tokens (then on EOS)."""

    def __init__(self, config, tokenizer: DTokenizer, script: Callable[[str], str]):
        super().__init__(config)
        self.tokenizer, self.script = tokenizer, script
        self.full = next(i for i, g in enumerate(config.text.layers) if g.layer_type == FULL)
        self.opener = tokenizer.encode("<|turn>model\n")
        self.replies: dict[tuple, list[int]] = {}

    @torch.no_grad()
    def encode(self, ids, cache, positions=None):
        out = super().encode(ids, cache, positions)
        cache.keys[self.full][:, 0, -ids.shape[1] :, 0] = ids.float()
        return out

    def _reply_start(self, ids: list[int]) -> int:
        starts = [i + len(self.opener) for i in range(len(ids)) if ids[i : i + len(self.opener)] == self.opener]
        starts += [i + 1 for i, t in enumerate(ids) if t == 51]
        return max(starts, default=len(ids))

    @torch.no_grad()
    def denoise(self, canvas, cache, soft=None, positions=None):
        b, c = canvas.shape
        logits = torch.zeros(b, c, self.text.vocab_size)
        for row in range(b):
            valid = cache.positions[self.full][row] >= 0
            ids = cache.keys[self.full][row, 0, valid, 0].round().long().tolist()
            start = self._reply_start(ids)
            key = tuple(ids[:start])
            if key not in self.replies:
                context = self.tokenizer.decode(ids[:start], skip_special=False)
                self.replies[key] = self.tokenizer.encode(self.script(context)) + [EOS_IDS[1]]
            reply = self.replies[key][len(ids) - start :]
            for j in range(c):
                logits[row, j, reply[j] if j < len(reply) else 0] = 30.0
        return logits


def scripted_pipeline(path: Path, script: Callable[[str], str], canvas_length: int = 16) -> Pipeline:
    """A Pipeline over `gemma4_checkpoint(path)` whose model follows `script`."""
    base = Pipeline.load(gemma4_checkpoint(path, canvas_length), device="cpu", dtype="float32")
    model = ScriptedModel(base.model.config, base.tokenizer, script)
    model.load_state_dict(base.model.state_dict())
    model.eval()
    return Pipeline(model, base.tokenizer, base.settings, base.model_dir)
