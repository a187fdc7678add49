"""Memory-mapped text columns read back exactly what was written."""

from training.ranking.text_column import TextColumn, write_text_column


def test_rows_round_trip_including_empty_and_non_ascii(tmp_path):
    values = ["Vitamin D", "", "β-blockers · 5 µg", "naïve 🧪 test", "last"]
    column = TextColumn(write_text_column(tmp_path / "texts.utf8", values))
    assert len(column) == len(values)
    assert [column[i] for i in range(len(values))] == values


def test_an_empty_column_has_no_rows(tmp_path):
    assert len(TextColumn(write_text_column(tmp_path / "none.utf8", []))) == 0
