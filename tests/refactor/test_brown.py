# SPDX-License-Identifier: Apache-2.0
"""Reading the Brown Corpus in its tagged npm layout (no network: a sample
laid out the way the package lays it out)."""

import pytest

from vllm_readme import ReadMEConfigError
from vllm_readme.refactor.brown import read_brown, untag

SAMPLE = """

\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at investigation/nn of/in
Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at evidence/nn ''/'' that/cs any/dti
irregularities/nns took/vbd place/nn ./.


\tIt/pps did/dod n't/* say/vb (/( much/ap )/) ,/, however/rb ;/. they're/ppss+ber done/vbn ./.
"""


def test_untag_restores_plain_prose_and_paragraphs():
    text = untag(SAMPLE)
    assert text.split("\n\n") == [
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced "
        '"no evidence" that any irregularities took place.',
        "It didn't say (much), however; they're done.",
    ]


def test_categories_come_from_cats_txt(tmp_path):
    (tmp_path / "ca01").write_text(SAMPLE)
    (tmp_path / "cp01").write_text("Love/nn is/bez here/rb ./.")
    (tmp_path / "cats.txt").write_text("ca01 news\ncp01 romance\ncz99 missing\n")
    docs = read_brown(tmp_path)
    assert sorted(docs) == ["news", "romance"] and docs["romance"] == ["Love is here."]


def test_an_empty_corpus_is_named(tmp_path):
    (tmp_path / "cats.txt").write_text("ca01 news\n")
    with pytest.raises(ReadMEConfigError, match="no Brown Corpus samples found"):
        read_brown(tmp_path)
