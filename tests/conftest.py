"""Shared fixtures: a character-level tokenizer and tiny random Llama models, all offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import string  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

SPECIALS = ["<unk>", "<pad>", "<eos>"]


def char_tokenizer():
    """A tokenizer with one token per printable character (plus <unk>, <pad>, <eos>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")


def load_benchmark(name):
    """Import ``benchmarks/NAME.py`` (a script folder, not a package) as a module."""
    return load_script(name, "benchmarks")


def load_script(name, folder="scripts"):
    """Import ``FOLDER/NAME.py`` of the repository (a script folder, not a package) as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_llama(vocab_size, seed=0, tie=True, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=kw.pop("max_position_embeddings", 256),
                      tie_word_embeddings=tie, eos_token_id=2, pad_token_id=1, bos_token_id=None,
                      attn_implementation="sdpa", initializer_range=kw.pop("initializer_range", 0.2), **kw)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    """make_model(k=4, **options) -> KTokenMerging on a tiny random Llama, float32, CPU."""
    from ktm import KTokenMerging

    def make(k=4, seed=0, tie=True, init="mean", **options):
        base = tiny_llama(len(tokenizer), seed=seed, tie=tie)
        options.setdefault("lora_dropout", 0.0)
        m = KTokenMerging.from_base(base, k=k, tokenizer=tokenizer, seed=seed, encoder_init=init, **options)
        return m.eval()

    return make


def save_tiny_base(folder, max_positions=512):
    """A tiny random Llama and the character tokenizer saved as a model folder; returns it."""
    tok = char_tokenizer()
    tiny_llama(len(tok), max_position_embeddings=max_positions).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_seq_task(folder, n=8):
    """A tiny jsonl task folder (train and test splits of ``n`` rows): "seq ab..." -> "b"."""
    import json

    folder.mkdir(parents=True)
    for split in ("train", "test"):
        rows = [json.dumps({"prompt": f"seq {'ab' * (i % 3 + 1)}", "answer": "b"}) for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def trained_checkpoint(folder, base, k=3, seed=0, **options):
    """A saved ktm model whose LoRA is random, not zero, and (for method merge) whose encoder is
    random, not the mean: merging the LoRA then changes the weights, and the encoder is not plain
    averaging. Returns the model."""
    from ktm import KTokenMerging

    if options.get("method", "merge") == "merge":
        options.setdefault("encoder_init", "paper")
    m = KTokenMerging.from_base(base, k=k, seed=seed, lora_dropout=0.0, **options).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.trainable_parameters()["lora"]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    m.save_pretrained(folder)
    return m


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two threads wait
    on each other for milliseconds per operation (as in test_bench). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny model folder (512 positions), shared by a test module's tests."""
    return save_tiny_base(tmp_path_factory.mktemp("base"))

