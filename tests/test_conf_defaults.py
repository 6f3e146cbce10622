"""The module's built-in defaults are the option table's.

nginx runs a config that sets no omni_* http directive at all, and
/omni/status's "config" object (the effective value of every omni_* http
directive, keyed by its name without omni_, durations in ms as NAME_ms,
sizes in bytes) must show exactly the defaults of omni_ctl.conf.OPTIONS.
"""

import re
import subprocess

import pytest

from omni_ctl import conf, paths

HTTP_OMNI_DIRECTIVE = re.compile(r"^    omni_\w+ [^;]*;\n", re.M)


def test_c_defaults_agree_with_the_option_table(omni_nginx):
    proxy = omni_nginx(start=False)
    text = proxy.conf_path.read_text()
    bare = HTTP_OMNI_DIRECTIVE.sub("", text)
    # what was removed is exactly the table's directives (none is required)
    removed = [line.split()[0] for line in HTTP_OMNI_DIRECTIVE.findall(text)]
    assert removed == [d for d, _ in proxy.conf.omni_directives()]
    proxy.conf_path.write_text(bare)
    proxy.start()

    status = proxy.status()
    assert "config" in status, (
        "/omni/status has no \"config\" object: this test needs the module's "
        "report of its effective omni_* settings (issue 19, point 3)")
    expected = conf.directive_defaults()
    shown = {k: status["config"].get(k) for k in expected}
    assert shown == expected, "the module's defaults differ from omni_ctl.conf.OPTIONS"


BOUNDED = [o for o in conf.OPTIONS if o.directive and o.maximum is not None]


@pytest.mark.parametrize("opt", BOUNDED, ids=[o.directive for o in BOUNDED])
def test_the_module_refuses_what_the_option_table_refuses(omni_nginx, opt):
    """A directive written by hand past the table's maximum is refused by
    nginx with the directive named, as gen-conf refuses the option; the
    maximum itself is taken."""
    proxy = omni_nginx(start=False)
    text = proxy.conf_path.read_text()
    line = re.compile(rf"^    {opt.directive} [^;]*;$", re.M)
    assert line.search(text)

    def nginx_t(value):
        proxy.conf_path.write_text(line.sub(f"    {opt.directive} {value};", text))
        return subprocess.run([paths.nginx_binary(), "-t", "-p", str(proxy.prefix),
                               "-c", str(proxy.conf_path)], env=paths.nginx_env(),
                              capture_output=True, text=True)

    assert nginx_t(opt.maximum).returncode == 0
    res = nginx_t(opt.maximum + 1)
    assert res.returncode != 0
    assert f'"{opt.directive}" must be at most {opt.maximum}' in res.stderr
