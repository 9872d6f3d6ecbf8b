# Helpers shared by the default rules. Not a rule: rules are palisade.rules.<id>.
package palisade.lib

import data.palisade.lists

# The last component of a path ("/usr/bin/bash" -> "bash"). Undefined for a non-string (a
# process whose exe could not be read has exe null), in both engines.
basename(path) := last if {
	is_string(path)
	parts := split(path, "/")
	last := parts[count(parts) - 1]
}

# A path as an absolute, cleaned path. An open's path is already the kernel's canonical path
# of the opened file (input.open.path_resolved), which this leaves as it is. Other paths are
# as the process passed them, so a relative one is resolved against the process's cwd (right
# for AT_FDCWD, when the cwd is known), and "." / ".." / "//" are folded so
# "/etc/../etc//shadow" is still /etc/shadow. A relative path with no known cwd stays as it is.
abs_path(path) := clean(path) if {
	startswith(path, "/")
} else := clean(concat("/", [input.process.cwd, path])) if {
	is_string(input.process.cwd)
	input.process.cwd != ""
} else := path

clean(path) := path if {
	not contains(path, "/.")
	not contains(path, "//")
	not endswith(path, "/")
} else := path if {
	# Dotfiles ("/root/.ssh/id_rsa") are clean too: only "." and ".." components need folding.
	# Only what fails both checks pays for the regular expressions.
	not contains(path, "//")
	not contains(path, "/./")
	not contains(path, "/../")
	not strings.any_suffix_match(path, ["/", "/.", "/.."])
} else := cleaned if {
	a := regex.replace(path, `/+`, "/")
	b := regex.replace(a, `(/\.)+(/|$)`, "/")
	# Each pass folds one "dir/.." level; four cover any path a human would write.
	c := regex.replace(b, `/[^/]+/\.\.(/|$)`, "/")
	d := regex.replace(c, `/[^/]+/\.\.(/|$)`, "/")
	e := regex.replace(d, `/[^/]+/\.\.(/|$)`, "/")
	f := regex.replace(e, `/[^/]+/\.\.(/|$)`, "/")
	g := regex.replace(f, `^(/\.\.)+(/|$)`, "/")
	cleaned := trim_suffix_slash(g)
}

trim_suffix_slash(p) := p if {
	not endswith(p, "/")
} else := p if {
	p == "/"
} else := trim_right(p, "/")

# The paths an event names, absolute and cleaned. Rules use these rather than calling abs_path
# themselves: a rule's value is computed once per event and shared by every rule that reads it,
# a function is called again by each caller.
open_path := abs_path(input.open.path)

exec_path := abs_path(input.exec.filename)

chmod_path := abs_path(input.chmod.path)

unlink_path := abs_path(input.unlink.path)

rename_old_path := abs_path(input.rename.old_path)

rename_new_path := abs_path(input.rename.new_path)

# A program name without a version suffix ("python3.11" -> "python").
unversioned(program) := trim_right(program, "0123456789.-")

# The names a process goes by: its comm and the basename of its exe (a renamed binary changes
# one of them, rarely both).
process_names contains input.process.comm

process_names contains basename(input.process.exe)

# The program an exec event starts: the file executed and argv[0] (without the "-" a login
# shell's argv[0] starts with).
exec_names contains basename(input.exec.filename)

exec_names contains trim_left(basename(input.exec.argv[0]), "-")

# The shell or interpreter names of an exec event, and whether the process itself is a shell.
# (Rules use these rather than calling a lib function on members of exec_names: the tree
# interpreter of regorus 0.14 loses such calls when the set comes from another package.)
exec_shells contains program if {
	some program in exec_names
	program in lists.shells
}

exec_interpreters contains program if {
	some program in exec_names
	unversioned(program) in lists.interpreters
}

process_is_shell if {
	some program in process_names
	program in lists.shells
}

# The pod's namespace, or "" outside any pod.
pod_namespace := input.pod.namespace

pod_namespace := "" if input.pod == null

# Pods whose job is privileged (CNI agents, node monitors) are left alone by the escape rules.
exempt_pod if pod_namespace in lists.privileged_namespaces

# The parent: the first ancestor.
parent := input.process.ancestors[0]

# errno text for messages about failed attempts.
outcome(result) := "" if result >= 0

outcome(result) := sprintf(" (failed: errno %d)", [0 - result]) if result < 0

# A file mode as the 4 octal digits people write (2541 -> "4755").
octal_mode(mode) := concat("", [sprintf("%d", [bits.and(bits.rsh(mode, shift), 7)]) | some shift in [9, 6, 3, 0]])
