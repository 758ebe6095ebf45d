"""Build a tiny random-weight Llama model and tokenizer that vLLM can load on a CPU.

No model can be downloaded here, so tests and demos run against this one. Its output is
gibberish, but its token ids are deterministic, which is what the tests need.

Usage: python data/build_tiny_model.py [OUT_DIR]   (default: data/tiny-model)
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "tiny-model"
SEED = 0
VOCAB_SIZE = 512
CORPUS_LINES = 4000

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]

# Role-tagged turns, each closed by EOS. No BOS here: the tokenizer adds it when encoding.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Files whose presence means a previous build finished (builds are renamed into place whole).
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def words(text: str) -> list[str]:
    return text.split()


# Common English words, so that prompts built from ordinary English tokenize compactly.
WORDS = words(
    """
the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by not word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal
point mother world near build self earth father head stand own page should country found
answer school grow study still learn plant cover food sun four between state keep eye never
last let thought city tree cross farm hard start might story saw far sea draw left late run
while press close night real life few north open seem together next white children begin got
walk example ease paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain stop once
base hear horse cut sure watch color face wood main enough plain girl usual young ready above
ever red list though feel talk bird soon body dog family direct pose leave song measure door
product black short numeral class wind question happen complete ship area half rock order fire
south problem piece told knew pass since top whole king space heard best hour better true
during hundred five remember step early hold west ground interest reach fast verb sing listen
six table travel less morning ten simple several vowel toward war lay against pattern slow
center love person money serve appear road map rain rule govern pull cold notice voice energy
hunt probable bed brother egg ride cell believe perhaps pick sudden count square reason length
represent art subject region size vary settle speak weight general ice matter circle pair
include divide syllable felt grand ball yet wave drop heart present heavy dance engine position
arm wide sail material fraction forest sit race window store summer train sleep prove lone leg
exercise wall catch mount wish sky board joy winter sat written wild instrument kept glass
grass cow job edge sign visit past soft fun bright gas weather month million bear finish happy
hope flower clothe strange gone trade melody trip office receive row mouth exact symbol die
least trouble shout except wrote seed tone join suggest clean break lady yard rise bad blow oil
blood touch grew cent mix team wire cost lost brown wear garden equal sent choose fell fit flow
fair bank collect save control decimal ear else quite broke case middle kill son lake moment
scale loud spring observe child straight consonant nation dictionary milk speed method organ
pay age section dress cloud surprise quiet stone tiny climb cool design poor lot experiment
bottom key iron single stick flat twenty skin smile crease hole trade summarise translate
explain describe compare list write answer question text English German French Spanish
"""
)

PUNCTUATION = [".", ",", "?", "!", ":", ";"]


def is_complete(out_dir: Path) -> bool:
    """Whether out_dir already holds a finished build."""
    return all((out_dir / name).is_file() for name in REQUIRED_FILES)


def corpus(rng: random.Random, lines: int = CORPUS_LINES) -> Iterator[str]:
    """Deterministic English-like lines, weighted towards frequent words as real text is."""
    weights = [1.0 / (rank + 10) for rank in range(len(WORDS))]
    for _ in range(lines):
        words = rng.choices(WORDS, weights=weights, k=rng.randint(4, 30))
        words[0] = words[0].capitalize()
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2030)))
        yield " ".join(words) + rng.choice(PUNCTUATION)


def build_tokenizer(out_dir: Path) -> int:
    """Train a byte-level BPE tokenizer that adds BOS, save it; return its length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(random.Random(SEED)), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=VOCAB_SIZE,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out_dir)
    return len(fast)


def build_model(out_dir: Path, tokenizer_len: int) -> None:
    """Save a seeded random LlamaForCausalLM (head_dim 32: vLLM's CPU attention needs >= 32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if tokenizer_len > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tokenizer_len} tokens, model vocab is {VOCAB_SIZE}")
    tok = PreTrainedTokenizerFast.from_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)


def publish_permissions(folder: Path) -> None:
    """Give the build the usual umask-based modes (mkdtemp makes it private to its owner)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def build(out_dir: Path = DEFAULT_OUT) -> Path:
    """Build into a temporary sibling folder, then rename, so no half-built model is left."""
    out_dir = Path(out_dir).resolve()
    if is_complete(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        build_model(tmp, build_tokenizer(tmp))
        publish_permissions(tmp)
        if out_dir.exists() and not is_complete(out_dir):
            shutil.rmtree(out_dir)
        try:
            tmp.rename(out_dir)
        except OSError:
            if not is_complete(out_dir):  # not a concurrent build finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str]) -> int:
    out = build(Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
