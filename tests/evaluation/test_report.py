"""The report's HTML is a real document, and the project's own targets appear only in a demo's report."""

from html.parser import HTMLParser

from ifguide.evaluation.results import _html, _target_lines

VOID = {"meta", "img", "br", "hr", "input", "link"}


class TagStack(HTMLParser):
    """Fails on a closing tag that does not close the innermost open element; records every tag seen."""

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.seen: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.seen.append(tag)
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):  # <img ... />
        self.seen.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing open"


def test_the_html_report_is_real_html(tmp_path):
    plot = tmp_path / "toxicity_vs_perplexity.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    markdown = ("# RTP: comparison\n\nAveraged over seeds.\n\n| method | EMT |\n|---|---|\n| `filter` | "
                "0.429 |\n\n- [ifguide](../masks/ifguide/inspect.html)\n- beats `filter` on EMT: "
                "no\n\n![toxicity vs perplexity](toxicity_vs_perplexity.png)\n")
    page = _html(markdown, plot)
    parser = TagStack()
    parser.feed(page)
    assert parser.open == []  # every element closed, in order
    assert {"th", "td", "tr", "thead", "tbody", "ul", "li", "code", "img", "h1"} <= set(parser.seen)
    assert "`" not in page and "<p>- " not in page
    assert "data:image/png;base64," in page and "@media print" in page


def test_targets_are_stated_only_in_a_demo_report():
    removed = {"value": 0.52, "ci": [0.31, 0.74]}
    targets = {"ifguide-self": {"emt_reduction_x": 1.2, "share_reduction_x": 1.5, "removed_share": removed,
                                "heldout_ppl_rise": 0.01, "beats_filter_on_emt": "tie",
                                "emt_minus_filter": {"value": 0.01, "ci": [-0.02, 0.04]}}}
    user = _target_lines(targets, "jigsaw-lstm", goals=False)
    assert "- EMT reduction: 1.20x" in user and not any("target" in line for line in user)
    tie = "- beats `filter` on EMT: tie (EMT minus filter's +0.010 [-0.020, +0.040])"
    assert tie in user
    demo = _target_lines(targets, "jigsaw-lstm", goals=True)
    removed_line = ("- removed share of the baseline's EMT above `clean`: 52.0% [31.0%, 74.0%] "
                    "(target >= 100%)")
    assert removed_line in demo


def test_a_rows_intervals_do_not_depend_on_the_other_rows(tmp_path, monkeypatch):
    import numpy as np

    from ifguide.evaluation import tables

    scores = {"a": np.random.default_rng(1).random((30, 5)), "b": np.random.default_rng(2).random((30, 5))}
    toxic = np.array([True, False] * 15, dtype=object)
    monkeypatch.setattr(tables, "_score_matrix", lambda d, scorer, n: (scores[d.name], toxic))
    monkeypatch.setattr(tables, "read_info", lambda path: {})
    for name in scores:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text('{"num_samples": 5, "perplexity": null, '
                                                      '"scorers": {"s": {"all": {"emt": 0.5}}}}')

    def table(names):
        monkeypatch.setattr(tables, "comparable_evaluations",
                            lambda run, prompts, scorer: ({n: [tmp_path / n] for n in names}, []))
        return tables.method_table(type("R", (), {"model": lambda self, name: tmp_path})(), "rtp", "s", 200)

    alone, both = table(["b"]), table(["a", "b"])
    assert alone["b"]["all"]["emt"]["ci"] == both["b"]["all"]["emt"]["ci"]
