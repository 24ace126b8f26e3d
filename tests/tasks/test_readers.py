import hashlib
import json

import pytest

from tasks.readers import InputError, _load_json, leaf_category, read_lcrec, read_recbole


def raises_input_error(call, *fragments: str) -> str:
    """Call, expect InputError, and check that its message holds every fragment."""
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_lcrec_dense_ids_follow_numeric_source_order(write_lcrec):
    # Keys written out of order; numeric order 7 < 9 < 40 < 100 gives dense 0..3
    # (lexicographic order would put "100" first).
    items = {
        "100": {"title": "Scale", "brand": "  ", "categories": "Lab"},
        "7": {"title": "Pipette", "description": "10 ul", "brand": " Acme ", "categories": "Lab,Tools,Pipettes"},
        "40": {"title": "Flask", "brand": "Acme", "categories": " Lab , Glass "},
        "9": {"title": "Beaker", "categories": "Lab,Tools,"},
    }
    inter = {"10": [7, 9, 40, 100], "2": [40, 7, 9], "1": [100, 40, 7]}
    raw = read_lcrec(write_lcrec(inter, items), "Tiny")

    assert raw.items["item_id"].to_list() == [0, 1, 2, 3]
    assert raw.items["source_item_id"].to_list() == ["7", "9", "40", "100"]
    assert raw.items["title"].to_list() == ["Pipette", "Beaker", "Flask", "Scale"]
    assert raw.items["description"].to_list() == ["10 ul", None, None, None]
    # " Acme " is stripped; missing and blank ("  ") brands are null.
    assert raw.items["brand"].to_list() == ["Acme", None, "Acme", None]
    # Leaf = last non-empty entry: "Pipettes"; "Lab,Tools," -> "Tools"; " Lab , Glass " -> "Glass"; "Lab".
    assert raw.items["category"].to_list() == ["Pipettes", "Tools", "Glass", "Lab"]

    # Users 1, 2, 10 -> dense 0, 1, 2 (lexicographic would give 1, 10, 2).
    # user "1": 100, 40, 7 -> 3, 2, 0; user "2": 40, 7, 9 -> 2, 0, 1; user "10": 7, 9, 40, 100 -> 0..3.
    inter_frame = raw.interactions
    assert inter_frame["user_id"].to_list() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert inter_frame["source_user_id"].to_list() == ["1"] * 3 + ["2"] * 3 + ["10"] * 4
    assert inter_frame["item_id"].to_list() == [3, 2, 0, 2, 0, 1, 0, 1, 2, 3]
    assert inter_frame["position"].to_list() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3]
    assert inter_frame["timestamp"].null_count() == 10  # LC-Rec has no timestamps


def test_lcrec_records_the_sha256_of_each_source_file(write_lcrec):
    root = write_lcrec()
    raw = read_lcrec(root, "Tiny")
    inter, item = root / "Tiny.inter.json", root / "Tiny.item.json"
    assert raw.source_files == {
        str(inter): hashlib.sha256(inter.read_bytes()).hexdigest(),
        str(item): hashlib.sha256(item.read_bytes()).hexdigest(),
    }


def test_lcrec_without_item_file_takes_items_from_the_sequences(write_lcrec):
    # Items seen: 5, 30, 8 -> sorted 5, 8, 30 -> dense 0, 1, 2; no text at all.
    raw = read_lcrec(write_lcrec({"0": [30, 5, 8]}, items=None), "Tiny")
    assert raw.items["source_item_id"].to_list() == ["5", "8", "30"]
    assert raw.items["title"].null_count() == 3
    assert raw.interactions["item_id"].to_list() == [2, 0, 1]


def test_lcrec_prebuilt_index_lands_in_prebuilt_code(write_lcrec):
    # Item 4 is in the index only: it is still an item (dense 3), as in the instruments data.
    index = {"1": ["<a_1>", "<b_9>"], "2": ["<a_2>", "<b_0>"], "3": ["<a_1>", "<b_3>"], "4": ["<a_7>", "<b_7>"]}
    root = write_lcrec({"0": [3, 1, 2]}, items=None, index=index)
    raw = read_lcrec(root, "Tiny", "Tiny.index.json")
    assert raw.items["source_item_id"].to_list() == ["1", "2", "3", "4"]
    assert raw.items["prebuilt_code"].to_list() == [
        ["<a_1>", "<b_9>"], ["<a_2>", "<b_0>"], ["<a_1>", "<b_3>"], ["<a_7>", "<b_7>"]
    ]
    assert str(root / "Tiny.index.json") in raw.source_files


def test_lcrec_without_index_has_no_prebuilt_code(write_lcrec):
    assert "prebuilt_code" not in read_lcrec(write_lcrec(), "Tiny").items.columns


@pytest.mark.parametrize(
    "path_text, leaf",
    [("A,B,C", "C"), ("A", "A"), (" A , B ", "B"), ("A,B,", "B"), ("", None), (" , ", None), (None, None)],
)
def test_leaf_category_is_the_last_non_empty_entry(path_text, leaf):
    assert leaf_category(path_text) == leaf


def test_malformed_json(write_lcrec):
    root = write_lcrec('{"1": [10, 11,, 12]}')
    # The second comma is character 15 of line 1: `{"1": [10, 11,` is 14 characters.
    raises_input_error(lambda: read_lcrec(root, "Tiny"),
                       str(root / "Tiny.inter.json"), "line 1 column 15", "invalid JSON")


def test_truncated_json(write_lcrec):
    text = '{"1": [10, 11, 12],\n "2": [10, 11, 12]}'
    root = write_lcrec(text[: len(text) // 2])  # 40 // 2 = 20 characters: '{"1": [10, 11, 12],\n'
    # A key should follow the comma; json reports the spot right after it: `{"1": [10, 11, 12],` is
    # 19 characters, so line 1, column 20.
    raises_input_error(lambda: read_lcrec(root, "Tiny"),
                       str(root / "Tiny.inter.json"), "line 1 column 20", "truncated")


def test_truncated_item_file(write_lcrec):
    text = json.dumps({"7": {"title": "Pipette"}, "9": {"title": "Beaker"}})
    root = write_lcrec({"1": [7, 9, 7]}, items=text[: len(text) // 2])
    raises_input_error(lambda: read_lcrec(root, "Tiny"), str(root / "Tiny.item.json"), "invalid JSON")


def test_unknown_item(write_lcrec):
    root = write_lcrec({"1": [7, 9, 99]})  # 99 is not in the default item file (7, 9, 40, 100)
    raises_input_error(lambda: read_lcrec(root, "Tiny"),
                       str(root / "Tiny.inter.json"), "user '1'", "position 2", "item 99", "Tiny.item.json")


def test_negative_item_id(write_lcrec):
    root = write_lcrec({"1": [7, -3, 9]})
    raises_input_error(lambda: read_lcrec(root, "Tiny"),
                       str(root / "Tiny.inter.json"), "user '1'", "position 1", "-3", "negative")


@pytest.mark.parametrize("bad, shown", [(1.5, "1.5"), ("3", "'3'"), (True, "True"), (None, "None")])
def test_non_integer_item_id(write_lcrec, bad, shown):
    root = write_lcrec({"1": [7, 9, bad]})
    raises_input_error(lambda: read_lcrec(root, "Tiny"),
                       str(root / "Tiny.inter.json"), "user '1'", "position 2", shown, "not an integer")


@pytest.mark.parametrize("key", ["u1", "-1", "01", "1.0", " 1", "3\n"])
def test_non_integer_user_key(write_lcrec, key):
    # "3\n" once slipped through (`$` matches before a final newline) and became a second user 3.
    root = write_lcrec({"3": [7, 9, 40], key: [7, 9, 40]})
    raises_input_error(lambda: read_lcrec(root, "Tiny"),
                       str(root / "Tiny.inter.json"), f"user {key!r}", "non-negative integer")


def test_non_integer_item_key(write_lcrec):
    root = write_lcrec({"1": [7, 7, 7]}, items={"7": {"title": "a"}, "x8": {"title": "b"}})
    raises_input_error(lambda: read_lcrec(root, "Tiny"),
                       str(root / "Tiny.item.json"), "item 'x8'", "non-negative integer")


def test_empty_sequence(write_lcrec):
    root = write_lcrec({"1": [7, 9, 40], "2": []})
    raises_input_error(lambda: read_lcrec(root, "Tiny"), str(root / "Tiny.inter.json"), "user '2'", "empty sequence")


def test_sequence_that_is_not_a_list(write_lcrec):
    root = write_lcrec({"1": {"0": 7}})
    raises_input_error(lambda: read_lcrec(root, "Tiny"), str(root / "Tiny.inter.json"), "user '1'", "list")


def test_duplicate_user_key(write_lcrec):
    root = write_lcrec('{"1": [7, 9, 40], "2": [9, 40, 7], "1": [40, 9, 7]}')
    raises_input_error(lambda: read_lcrec(root, "Tiny"), str(root / "Tiny.inter.json"), "key '1'", "duplicate")


def test_duplicate_item_key(write_lcrec):
    root = write_lcrec({"1": [7, 9, 7]}, items='{"7": {"title": "a"}, "9": {"title": "b"}, "7": {"title": "c"}}')
    raises_input_error(lambda: read_lcrec(root, "Tiny"), str(root / "Tiny.item.json"), "key '7'", "duplicate")


def test_non_utf8_bytes_in_a_title(write_lcrec):
    items = b'{"7": {"title": "Pipette"}, "9": {"title": "Bea\xff\xfeker"}}'
    root = write_lcrec({"1": [7, 9, 7]}, items=items)
    raises_input_error(lambda: read_lcrec(root, "Tiny"),
                       str(root / "Tiny.item.json"), "item '9'", "field 'title'", "not valid UTF-8")


def test_non_utf8_bytes_in_an_index_code(write_lcrec):
    # This used to escape as a UnicodeEncodeError from polars instead of an InputError.
    index = b'{"7": ["<a_1>"], "9": ["<a_\xff>"]}'
    root = write_lcrec({"1": [7, 9, 7]}, items=None, index=index)
    raises_input_error(lambda: read_lcrec(root, "Tiny", "Tiny.index.json"),
                       str(root / "Tiny.index.json"), "item '9'", "field 'code'", "not valid UTF-8")


def test_missing_title(write_lcrec):
    root = write_lcrec({"1": [7, 9, 7]}, items={"7": {"title": "a"}, "9": {"brand": "Acme"}})
    raises_input_error(lambda: read_lcrec(root, "Tiny"),
                       str(root / "Tiny.item.json"), "item '9'", "field 'title'", "missing")


@pytest.mark.parametrize("name, value, type_name", [("brand", 5, "int"), ("categories", ["Lab", "Glass"], "list"),
                                                    ("title", {"en": "a"}, "dict")])
def test_non_string_field(write_lcrec, name, value, type_name):
    root = write_lcrec({"1": [7, 9, 7]}, items={"7": {"title": "a"}, "9": {"title": "b", name: value}})
    raises_input_error(lambda: read_lcrec(root, "Tiny"),
                       str(root / "Tiny.item.json"), "item '9'", f"field {name!r}", f"got {type_name}")


def test_item_index_without_a_code_for_a_listed_item(write_lcrec):
    root = write_lcrec({"1": [7, 9, 7]}, items=None, index={"7": ["<a_1>"]})
    raises_input_error(lambda: read_lcrec(root, "Tiny", "Tiny.index.json"),
                       str(root / "Tiny.inter.json"), "user '1'", "position 1", "item 9", "Tiny.index.json")


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
def test_empty_file(write_lcrec, content):
    root = write_lcrec(content)
    raises_input_error(lambda: read_lcrec(root, "Tiny"), str(root / "Tiny.inter.json"), "empty")


def test_empty_item_file(write_lcrec):
    root = write_lcrec({"1": [7, 9, 7]}, items=b"")
    raises_input_error(lambda: read_lcrec(root, "Tiny"), str(root / "Tiny.item.json"), "empty")


def test_missing_interactions_file(tmp_path):
    raises_input_error(lambda: read_lcrec(tmp_path, "Nope"), str(tmp_path / "Nope.inter.json"), "not found")


def test_missing_index_file(write_lcrec):
    root = write_lcrec()
    raises_input_error(lambda: read_lcrec(root, "Tiny", "absent.json"), str(root / "absent.json"), "not found")


def test_recbole_dense_ids_and_chronological_positions(write_recbole):
    inter = [
        "user_id:token\titem_id:token\trating:float\ttimestamp:float",
        "5\t20\t3\t300",  # line 2
        "5\t7\t1\t100",  # line 3: ties with line 5, comes first in the file
        "12\t3\t5\t50",
        "5\t3\t4\t100",  # line 5
        "12\t20\t2\t60",
        "12\t7\t2\t70",
    ]
    items = [
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
        "20\tGamma\t1997\tAction",
        "3\tAlpha\t1995\tDrama Comedy",
        "7\t Beta \t1996\t",
    ]
    raw = read_recbole(write_recbole(inter, items), "tiny")

    # Items 3, 7, 20 -> dense 0, 1, 2 (lexicographic would put "20" first).
    assert raw.items["source_item_id"].to_list() == ["3", "7", "20"]
    assert raw.items["title"].to_list() == ["Alpha", "Beta", "Gamma"]
    # The class column's first genre is the leaf; all genres go to `categories`.
    assert raw.items["category"].to_list() == ["Drama", None, "Action"]
    assert raw.items["categories"].to_list() == ["Drama,Comedy", None, "Action"]
    assert raw.items["brand"].null_count() == 3
    assert raw.items["description"].null_count() == 3

    # Users 5, 12 -> dense 0, 1. User 5: (100, line 3, item 7), (100, line 5, item 3), (300, item 20)
    # -> items 1, 0, 2. User 12: (50, item 3), (60, item 20), (70, item 7) -> 0, 2, 1.
    frame = raw.interactions
    assert frame["user_id"].to_list() == [0, 0, 0, 1, 1, 1]
    assert frame["source_user_id"].to_list() == ["5", "5", "5", "12", "12", "12"]
    assert frame["item_id"].to_list() == [1, 0, 2, 0, 2, 1]
    assert frame["position"].to_list() == [0, 1, 2, 0, 1, 2]
    assert frame["timestamp"].to_list() == [100, 100, 300, 50, 60, 70]


def test_recbole_field_with_a_unicode_line_separator_stays_one_line(write_recbole):
    # str.splitlines() breaks at U+2028; the file's line separator is only "\n".
    items = ["item_id:token\tmovie_title:token_seq\tclass:token_seq",
             "3\tAl\u2028pha\tDrama", "7\tBeta\tAction", "20\tGamma\tAction"]
    raw = read_recbole(write_recbole(items=items), "tiny")
    assert raw.items["title"].to_list() == ["Al\u2028pha", "Beta", "Gamma"]


def test_recbole_crlf_line_endings(write_recbole):
    # Same rows as the default file with "\r\n": the last field must not keep the "\r".
    data = "user_id:token\titem_id:token\ttimestamp:float\r\n5\t3\t20\r\n5\t7\t10\r\n5\t20\t30\r\n".encode()
    raw = read_recbole(write_recbole(data), "tiny")
    assert raw.interactions["timestamp"].to_list() == [10, 20, 30]
    assert raw.interactions["item_id"].to_list() == [1, 0, 2]  # items 7, 3, 20 -> 1, 0, 2


def test_recbole_wrong_number_of_fields(write_recbole):
    inter = ["user_id:token\titem_id:token\ttimestamp:float", "5\t3\t100", "5\t7", "5\t20\t300"]
    root = write_recbole(inter)
    raises_input_error(lambda: read_recbole(root, "tiny"),
                       str(root / "tiny.inter"), "line 3", "expected 3 tab-separated fields, got 2")


@pytest.mark.parametrize("stamp", ["abc", "", "nan", "inf"])
def test_recbole_non_numeric_timestamp(write_recbole, stamp):
    # "nan" and "inf" parse as floats and used to crash the cast to integers.
    inter = ["user_id:token\titem_id:token\ttimestamp:float", "5\t3\t100", f"5\t7\t{stamp}", "5\t20\t300"]
    root = write_recbole(inter)
    raises_input_error(lambda: read_recbole(root, "tiny"),
                       str(root / "tiny.inter"), "line 3", "field 'timestamp'", f"{stamp!r}")


def test_recbole_unknown_item(write_recbole):
    inter = ["user_id:token\titem_id:token\ttimestamp:float", "5\t3\t100", "5\t7\t200", "5\t99\t300"]
    root = write_recbole(inter)
    raises_input_error(lambda: read_recbole(root, "tiny"),
                       str(root / "tiny.inter"), "line 4", "field 'item_id'", "'99'", "tiny.item")


def test_recbole_duplicate_item(write_recbole):
    items = ["item_id:token\tmovie_title:token_seq\tclass:token_seq",
             "3\tAlpha\tDrama", "7\tBeta\tAction", "3\tAgain\tAction", "20\tGamma\tAction"]
    root = write_recbole(items=items)
    raises_input_error(lambda: read_recbole(root, "tiny"),
                       str(root / "tiny.item"), "line 4", "field 'item_id'", "duplicate item '3'")


def test_recbole_non_utf8_bytes(write_recbole):
    items = b"item_id:token\tmovie_title:token_seq\tclass:token_seq\n3\tAlpha\tDrama\n7\tBe\xfft\tAction\n"
    root = write_recbole(items=items)
    raises_input_error(lambda: read_recbole(root, "tiny"), str(root / "tiny.item"), "line 3", "not valid UTF-8")


def test_recbole_missing_id_column(write_recbole):
    root = write_recbole(["user:token\titem_id:token\ttimestamp:float", "5\t3\t100"])
    raises_input_error(lambda: read_recbole(root, "tiny"), str(root / "tiny.inter"), "field 'user_id'", "header")


def test_recbole_empty_and_missing_files(write_recbole, tmp_path):
    root = write_recbole(b"")
    raises_input_error(lambda: read_recbole(root, "tiny"), str(root / "tiny.inter"), "empty")
    raises_input_error(lambda: read_recbole(tmp_path, "nope"), str(tmp_path / "nope.inter"), "not found")


def test_duplicate_field_inside_an_item_names_the_item(tmp_path):
    path = tmp_path / "Dup.item.json"
    path.write_text('{"7": {"title": "a", "title": "b"}}')
    with pytest.raises(InputError, match=r"Dup.item.json: key '7', field 'title': duplicate key"):
        _load_json(path)


def test_recbole_fractional_timestamps_order_by_the_exact_value(write_recbole):
    # Truncated first, 100.9 (line 2) and 100.1 (line 3) both became 100 and kept file order.
    inter = ["user_id:token\titem_id:token\ttimestamp:float",
             "5\t3\t100.9", "5\t7\t100.1", "5\t20\t100", "5\t9\t99.99"]
    raw = read_recbole(write_recbole(inter, items=None), "tiny")
    # Items 3, 7, 9, 20 -> 0, 1, 2, 3. By value: 99.99 (9), 100 (20), 100.1 (7), 100.9 (3) -> 2, 3, 1, 0.
    assert raw.interactions["item_id"].to_list() == [2, 3, 1, 0]
    assert raw.interactions["timestamp"].to_list() == [99, 100, 100, 100]  # stored as whole seconds


def test_recbole_integer_timestamps_beyond_float_precision_stay_exact(write_recbole):
    # Nanoseconds: both round to the same float64 (1.7000000001234568e18).
    # 2**63 - 1, the largest 64-bit integer, is a float of 2**63: it must not fail that cast.
    inter = ["user_id:token\titem_id:token\ttimestamp:float", "5\t3\t1700000000123456789",
             "5\t7\t1700000000123456788", "5\t20\t1700000000123456790", "5\t9\t9223372036854775807"]
    raw = read_recbole(write_recbole(inter, items=None), "tiny")
    assert raw.interactions["item_id"].to_list() == [1, 0, 3, 2]  # 7, 3, 20, 9 (items 3, 7, 9, 20)
    assert raw.interactions["timestamp"].to_list() == [1700000000123456788, 1700000000123456789,
                                                       1700000000123456790, 2**63 - 1]


@pytest.mark.parametrize("stamp", ["1e30", "-1e30", "9223372036854775808", "9.3e18"])
def test_recbole_timestamp_out_of_range(write_recbole, stamp):
    # Beyond a 64-bit integer (2**63 = 9223372036854775808): the cast used to raise polars'
    # InvalidOperationError, naming neither the file nor the line.
    inter = ["user_id:token\titem_id:token\ttimestamp:float", "5\t3\t100", f"5\t7\t{stamp}", "5\t20\t300"]
    root = write_recbole(inter)
    raises_input_error(lambda: read_recbole(root, "tiny"), str(root / "tiny.inter"), "line 3",
                       "field 'timestamp'", f"{stamp!r}", "out of range")


def test_recbole_utf8_bom_before_the_header(write_recbole):
    # Excel and Notepad write a BOM; it used to become part of the first name ("\ufeffuser_id").
    inter = "\ufeffuser_id:token\titem_id:token\ttimestamp:float\n5\t3\t20\n5\t7\t10\n5\t20\t30\n".encode()
    items = "\ufeffitem_id:token\tmovie_title:token_seq\n3\tAlpha\n7\tBeta\n20\tGamma\n".encode()
    raw = read_recbole(write_recbole(inter, items), "tiny")
    assert raw.interactions["item_id"].to_list() == [1, 0, 2]  # 7, 3, 20 by time
    assert raw.items["title"].to_list() == ["Alpha", "Beta", "Gamma"]


def test_recbole_duplicate_header_field(write_recbole):
    inter = ["user_id:token\titem_id:token\titem_id:float\ttimestamp:float", "5\t3\t3\t100"]
    root = write_recbole(inter)
    raises_input_error(lambda: read_recbole(root, "tiny"), str(root / "tiny.inter"), "line 1",
                       "field 'item_id'", "columns 2 and 3")


def test_recbole_field_named_line_is_an_ordinary_column(write_recbole):
    # The reader numbers rows in a column of its own; a source field called `line` used to clash
    # with it (polars DuplicateError). It is kept out of the way, and errors still give file lines.
    inter = ["user_id:token\titem_id:token\tline:token\ttimestamp:float",
             "5\t3\tA\t20", "5\t7\tB\t10", "5\t20\tC\t30"]
    raw = read_recbole(write_recbole(inter), "tiny")
    assert raw.interactions["item_id"].to_list() == [1, 0, 2]
    bad = write_recbole([*inter, "5\t20\t7\toops"], folder="bad")
    raises_input_error(lambda: read_recbole(bad, "tiny"), "line 5", "field 'timestamp'", "'oops'")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_json_that_is_not_utf8(write_lcrec, encoding):
    inter = json.dumps({"1": [7, 9, 40]}).encode(encoding)
    root = write_lcrec(inter)
    raises_input_error(lambda: read_lcrec(root, "Tiny"), f"{root / 'Tiny.inter.json'}: not UTF-8 JSON")


def test_json_with_a_utf8_bom(write_lcrec):
    # RFC 8259 lets a parser ignore it; json.loads refuses it ("Unexpected UTF-8 BOM").
    root = write_lcrec(b"\xef\xbb\xbf" + json.dumps({"1": [7, 9, 40]}).encode())
    assert read_lcrec(root, "Tiny").interactions["item_id"].to_list() == [0, 1, 2]


def test_recbole_file_that_is_not_utf8(write_recbole):
    inter = "user_id:token\titem_id:token\ttimestamp:float\n5\t3\t20\n".encode("utf-16")
    root = write_recbole(inter)
    raises_input_error(lambda: read_recbole(root, "tiny"), f"{root / 'tiny.inter'}: not UTF-8 (it looks like UTF-16)")
