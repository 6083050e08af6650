from atq.stats import markdown_table


def test_markdown_table_right_aligns_numeric_columns():
    assert markdown_table(["name", "n", "x"], [["a", "1", "2.5"]], numeric_from=1).splitlines() == [
        "| name | n | x |", "| --- | ---: | ---: |", "| a | 1 | 2.5 |"]
