"""A sweep's grid points judged against a real scripted OpenAI-compatible server on
127.0.0.1 (tests/scripted_openai.py): the summary columns app/sweepscore.py computes are
the numbers the replies imply, unparseable replies are counted (never dropped), requests and
tokens are the server's own count."""

from __future__ import annotations

import json

import pytest

from app import sweeps, sweepscore
from tests.scripted_openai import Action, ScriptedServer, answer_of


class Params:
    judge = "judge-m"
    judge_structured_outputs = None
    judge_reply_retries = 1


def _records(answers: list[str]) -> list[dict]:
    return [{"key": f"pos_p0_q{i}", "label": "pos", "prompt_index": 0, "question_index": i,
             "system_prompt": "You are a magician.", "question": f"question {i}?",
             "response": a, "response_tokens": len(a.split())} for i, a in enumerate(answers)]


def _reply(answer: str) -> str:
    """Roles scale 0..3 (assistant_axis/judge.py line 68): 'n3' scores 3; 'bad' is off the
    scale on every ask."""
    return "7" if answer.startswith("bad") else answer[-1]


def test_points_get_judge_mean_refusal_rate_and_counts(monkeypatch):
    from app.settings import Settings

    with ScriptedServer(lambda req, n: Action(
            text=_reply(answer_of(req["messages"][0]["content"])))) as srv:
        monkeypatch.setenv("CHATSPACE_JUDGE_BASE_URL", srv.base_url)
        monkeypatch.setenv("CHATSPACE_JUDGE_MAX_RETRIES", "0")
        settings = Settings()
        score = sweepscore.point_scorer(dataset_name="roles_sample", persona="stage_magician",
                                        params=Params, settings=settings)
        answers = ["a 3", "b 0", "c 2", "d 3", "bad reply"]
        cols, detail = score(_records(answers))
    # judged: 3, 0, 2, 3; 'bad' asked twice (judge_reply_retries 1), unparseable both times
    assert cols["judge_mean"] == pytest.approx((3 + 0 + 2 + 3) / 4)
    assert cols["refusal_rate"] == pytest.approx(1 / 4)  # roles: 0 = refused
    j = cols["judge"]
    assert j["unparseable"] == 1 and j["counts"]["scored"] == 4 and j["judged"] == 4
    assert j["requests"] == 6 == len(srv.received) and j["asks"] == 6
    assert j["tokens"] == {"prompt": 6 * 11, "completion": 6 * 2, "total": 6 * 13}
    assert j["scale"] == "roles" and j["model"] == "judge-m"
    # the prompt is the persona file's eval_prompt filled as 3_judge.py does (line 100)
    from app.datasets import load_dataset
    from app.judge import judge_prompt

    eval_prompt = load_dataset("roles_sample", settings=settings).persona(
        "stage_magician").eval_prompt
    assert sorted(srv.prompts()[:5]) == sorted(
        judge_prompt(eval_prompt, question=f"question {i}?", answer=a)
        for i, a in enumerate(answers))
    assert srv.received[0].body["model"] == "judge-m"
    bad = next(s for s in detail["samples"] if s["outcome"] == "unparseable")
    assert bad["reply"] == "7" and bad["attempts"] == 2
    # the summary row carries the columns; the plot shows the judge score first
    row = {"persona": "stage_magician", "point": "L2_s0", "layer": 2, "scale": 0.0,
           **sweeps.summarize_point(_records(answers), cols)}
    assert row["judge_mean"] == cols["judge_mean"] and row["minilm_mean"] is None
    assert sweeps.plot_metrics([row]) == ["judge_mean", "refusal_rate"]
    json.dumps(row)  # stored as JSON


def test_no_judge_no_scorer_and_the_reason_stays():
    class NoJudge(Params):
        judge = None

    assert sweepscore.point_scorer(dataset_name="roles_sample", persona="stage_magician",
                                   params=NoJudge, settings=None) is None
    status = sweeps.scores_status()
    assert not status["judge"]["computed"] and "--judge" in status["judge"]["reason"]


@pytest.mark.slow
def test_minilm_scores_points_with_a_stored_classifier():
    """The real packaged all-MiniLM-L6-v2 (offline): a classifier trained as the pipeline's
    minilm stage trains it (app.minilm.score_dataset), read back from its JSON, scores a
    point of prompted-sounding answers above a point of plain ones; the column is the mean
    of Classifier.score over the point's responses."""
    import numpy as np

    from app.minilm import Rollout, embed, load_encoder, score_dataset

    enc = load_encoder()
    topics = ["the weather", "bread", "a good book", "the tides", "music", "a garden",
              "the stars", "a bicycle", "coffee", "the ocean"]
    pirate = [f"Arr matey, {t} be a fine treasure, says this old sea dog! Yo ho!"
              for t in topics]
    plain = [f"{t.capitalize()} is a common topic. Here is a short, neutral summary."
             for t in topics]
    trained = score_dataset([Rollout("pirate", f"pos_p0_q{i}", "pos", t)
                             for i, t in enumerate(pirate[:8])]
                            + [Rollout("pirate", f"default_p0_q{i}", "default", t)
                               for i, t in enumerate(plain[:8])], encoder=enc)
    clf = json.loads(json.dumps(trained["classifier"]))  # as stored in minilm.json
    score = sweepscore.minilm_scorer(clf, encoder=enc)
    steered = score(_records(pirate[8:]))["minilm_mean"]
    unsteered = score(_records(plain[8:]))["minilm_mean"]
    assert steered > 0.5 > unsteered
    from app.minilm import Classifier

    want = float(Classifier.from_dict(clf).score(embed(pirate[8:], encoder=enc)).mean())
    assert steered == pytest.approx(want)
    assert score([]) == {"minilm_mean": None}
    row = sweeps.summarize_point(_records(pirate[8:]), {"minilm_mean": steered})
    assert row["minilm_mean"] == steered and row["judge_mean"] is None
    assert np.isfinite(row["minilm_mean"])
