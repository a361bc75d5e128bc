"""dpo_core.concise (the real-model example's data) and the answer statistics generate.py prints."""

import json

import pytest

from dpo_core.concise import TEMPLATES, TOPICS, ConciseReport, concise_pairs, questions_for, split_topics
from dpo_core.generation import answer_stats, first_sentence


@pytest.mark.parametrize("text, first, n", [
    ("Paris is the capital. It is in France.", "Paris is the capital.", 2),
    ("One sentence only", "One sentence only", 1),
    ("Dr. Smith came. He left!", "Dr.", 3),  # a naive rule, stated: an abbreviation before a capital splits
    ("Pi is 3.14 and more. Next one? Yes.", "Pi is 3.14 and more.", 3),  # no split inside a number
    ("  ", "", 0),
    ("Wait... what? 42 is the answer.", "Wait... what?", 2),
])
def test_first_sentence(text, first, n):
    assert first_sentence(text) == (first, n)


def test_pairs_keep_the_first_sentence_of_multi_sentence_answers_and_count_the_rest():
    questions = ["q1", "q2", "q3", "q4", "q1"]
    answers = ["Gravity pulls things down. It keeps us on the ground.", "Short answer here.", "",
               "Yes. It is a long story.", "Gravity pulls things down. It keeps us on the ground."]
    report = ConciseReport()
    records = concise_pairs(questions, answers, system_prompt="Be brief.", report=report)
    assert records == [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"}],
                        "chosen": [{"role": "assistant", "content": "Gravity pulls things down."}],
                        "rejected": [{"role": "assistant", "content": answers[0]}]}]
    assert report.generated == 5 and report.kept == 1
    assert dict(report.dropped) == {"already one sentence": 1, "empty answer": 1,
                                    "first sentence under 4 words": 1, "duplicate answer": 1}
    assert "words per answer: rejected 10.0, chosen 4.0" in report.summary()


def test_held_out_topics_are_never_asked_in_training():
    train, held = split_topics(TOPICS, 16)
    assert len(held) == 16 and not set(train) & set(held) and train + held == TOPICS
    train_q, held_q = set(questions_for(train)), set(questions_for(held))
    assert len(train_q) == len(train) * len(TEMPLATES) and not train_q & held_q
    with pytest.raises(ValueError, match="held_out"):
        split_topics(TOPICS, len(TOPICS))


def test_answer_stats():
    stats = answer_stats(["One two three.", "A b. C d e f.", "x"])
    assert stats == {"answers": 3, "mean_words": pytest.approx(10 / 3), "median_words": 3, "one_sentence": pytest.approx(2 / 3)}
    json.dumps(stats)
