# Unit tests of the shared helpers (run by `palisade rules test rules/`, the `opa test` way).
package palisade.lib_test

import data.palisade.lib

test_absolute_paths_are_kept if {
	lib.abs_path("/etc/shadow") == "/etc/shadow" with input as {"process": {"cwd": "/app"}}
}

test_relative_paths_resolve_against_cwd if {
	lib.abs_path("sudoers.d/x") == "/etc/sudoers.d/x" with input as {"process": {"cwd": "/etc"}}
}

test_dot_dot_folds if lib.clean("/etc/../etc//shadow") == "/etc/shadow"

test_two_dot_dots_fold if lib.clean("/a/b/../../etc/./passwd") == "/etc/passwd"

test_dot_dots_above_root_stop_at_root if lib.clean("/../../etc/shadow") == "/etc/shadow"

test_trailing_slash_goes if lib.clean("/tmp/x/") == "/tmp/x"

test_root_stays_root if lib.clean("/./") == "/"

test_basename if {
	lib.basename("/usr/bin/python3.11") == "python3.11"
	lib.basename("bash") == "bash"
}

test_unversioned if {
	lib.unversioned("python3.11") == "python"
	lib.unversioned("php-fpm8") == "php-fpm"
}

test_octal_mode if {
	lib.octal_mode(2541) == "4755"
	lib.octal_mode(420) == "0644"
}

test_login_shell_argv0_is_a_shell if {
	lib.exec_shells == {"bash"} with input as {"exec": {"filename": "/bin/bash", "argv": ["-bash"]}}
}

test_outcome if {
	lib.outcome(3) == ""
	lib.outcome(-13) == " (failed: errno 13)"
}
