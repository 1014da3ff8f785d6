"""grefine_integrations: adapters that put grefine-hooks into host apps (installed as this name).

``grefine_hooks`` never imports anything here; each adapter's dependencies come with an extra
(``pip install 'grefine-hooks[serve]'``).
"""
