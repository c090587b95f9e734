//! The errors and conveniences a user meets at compile time: a type that cannot be carried is
//! named with its fix (`#[sdk::value]`), and user structs, `&str` and integer literals work.

#[test]
fn user_types_and_arguments_compile_and_a_wrong_type_says_how_to_fix_it() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/value_and_str.rs");
    t.compile_fail("tests/ui/not_a_value.rs");
}
