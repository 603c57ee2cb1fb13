"""What the model commands draw (``cluster/progress_view.py``): progress rows, and sizes
and ages in ``ollama list``'s words."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cluster.progress_view import Row, human_age, human_size, modified, progress_row
from tests.support.fake_corral import DIGEST


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (512, "512 B"),
        (1_500, "1.5 KB"),
        (135_000_000, "135 MB"),
        (2_000_000_000, "2 GB"),
        (4_700_000_000, "4.7 GB"),
        (12_345_000_000, "12 GB"),
        (1_300_000_000_000, "1.3 TB"),
    ],
)
def test_human_size_is_ollamas_decimal_units(n, text):
    assert human_size(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "Less than a second ago"),  # the server's clock a little ahead
        (0.4, "Less than a second ago"),
        (1, "1 second ago"),
        (42, "42 seconds ago"),
        (90, "About a minute ago"),
        (59 * 60, "59 minutes ago"),
        (3600 + 600, "About an hour ago"),
        (30 * 3600, "30 hours ago"),
        (3 * 86400, "3 days ago"),
        (20 * 86400, "2 weeks ago"),
        (100 * 86400, "3 months ago"),
        (800 * 86400, "2 years ago"),
    ],
)
def test_human_age_says_it_like_ollama_list(seconds, text):
    assert human_age(seconds) == text


def test_modified_reads_rfc3339_with_nanoseconds():
    now = datetime(2025, 1, 4, 12, 0, tzinfo=UTC)
    assert modified("2025-01-01T12:00:00.123456789Z", now) == "3 days ago"
    assert modified("2025-01-04T13:59:00+02:00", now) == "About a minute ago"
    assert modified("2025-01-04T11:00:00-00:00", now) == "About an hour ago"
    assert modified(None, now) == "Never"


def test_progress_rows_are_layer_bars_or_status_lines():
    layer = {"status": f"pulling {DIGEST[7:19]}", "digest": DIGEST, "total": 100, "completed": 40}
    assert progress_row(layer) == Row(DIGEST, "pulling 0123456789ab", 100, 40)
    assert progress_row({"status": "pulling manifest"}) == Row(
        "pulling manifest", "pulling manifest"
    )
    # a digest with nothing to count (create's "using existing layer") is a status line
    existing = {"status": "using existing layer", "digest": DIGEST}
    assert progress_row(existing) == Row("using existing layer", "using existing layer")
