"""One "did you mean" rule for every name looked up by string."""

from zoo.names import suggest


def test_suggest_names_the_nearest_choice_or_nothing():
    assert suggest("poolng", ["pooling", "attention"]) == " (did you mean 'pooling'?)"
    assert suggest("zzz", ["pooling", "attention"]) == ""


def test_a_registry_dict_suggests_its_keys_not_its_values():
    registry = {"pooling": object, "attention": int}
    assert suggest("poolng", registry) == " (did you mean 'pooling'?)"


def test_shown_as_maps_the_compared_name_to_the_suggested_one():
    assert suggest("lrate", ["lr"], shown_as={"lr": "optim.lr"}) == " (did you mean 'optim.lr'?)"
