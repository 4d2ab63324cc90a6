"""The run's vocabulary: the method registry is consistent, and names are built and read back by one rule
each."""

from ifguide.names import BY_NAME, METHODS, eval_name, method_of, model_name, row_order


def test_the_method_registry_is_consistent():
    assert len(BY_NAME) == len(METHODS)
    for method in METHODS:
        if method.decodes:  # a decoding method names a trained method, and RAD rows read METHOD+rad
            assert method.decodes in BY_NAME and not BY_NAME[method.decodes].decodes
            assert eval_name(model_name(method.decodes, 3), "rad") == model_name(method.name, 3)


def test_model_names_round_trip_and_sort_in_registry_order():
    assert model_name("ifguide-self",
                      1) == "ifguide-self-s1" and method_of("ifguide-self-s1") == "ifguide-self"
    assert method_of("ifguide-self-L0.04-lam2-s0") == "ifguide-self-L0.04-lam2"
    assert method_of("baseline") == "baseline"  # a name without a seed is its own method
    rows = ["ifguide-self-L0.04", "rad", "ifguide-self-matched", "baseline", "ifguide-self", "filter"]
    # a matched-tokens twin follows its row
    assert sorted(rows, key=row_order) == ["baseline", "filter", "rad", "ifguide-self",
                                           "ifguide-self-matched", "ifguide-self-L0.04"]
