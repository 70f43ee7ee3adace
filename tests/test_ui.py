"""MLflow UI in headless Chromium: a ccflow version page, and the champion alias set there.

Needs Debian's `chromium` and `chromium-driver` packages (`.ci/run` installs them) and the
`selenium` package of the dev extra; the test skips when the browser is missing.
"""

import shutil
import sys

import mlflow
import pytest

from ccflow import CHAMPION_ALIAS, REGISTERED_MODEL_NAME
from tests.local_server import LocalServer, free_port, mlflow_environment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 60


@pytest.fixture(scope="module")
def ui_server(trained_fnc_model, mlflow_backend, tmp_path_factory):
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", mlflow_backend,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    # Earlier tests may have set the champion alias already. The UI tests start without
    # it, so the page shows the "Add aliases" button and setting the alias is a change.
    client = mlflow.MlflowClient()
    if CHAMPION_ALIAS in client.get_registered_model(REGISTERED_MODEL_NAME).aliases:
        client.delete_registered_model_alias(REGISTERED_MODEL_NAME, CHAMPION_ALIAS)
    log_path = tmp_path_factory.mktemp("ui") / "server.log"
    server = LocalServer(command, mlflow_environment(mlflow_backend), log_path, f"http://127.0.0.1:{port}")
    try:
        server.wait_until_ready("/health", timeout_s=120)
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver not found; install Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # Chromium's sandbox does not start as root, which CI runs as.
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        # Every host name but the local server resolves to nothing, so the page cannot
        # reach any other host.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open_version_page(browser, ui_server, version):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{ui_server.url}/#/models/{REGISTERED_MODEL_NAME}/versions/{version}")
    WebDriverWait(browser, WAIT_S).until(
        EC.visibility_of_element_located((By.CSS_SELECTOR, "button[title='Add aliases']"))
    )
    return browser.find_element(By.TAG_NAME, "body").text


def test_version_page_shows_model_details(browser, ui_server, trained_fnc_model, tmp_path):
    version = trained_fnc_model.model_version
    run_name = mlflow.MlflowClient().get_run(trained_fnc_model.run_id).info.run_name

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        _open_version_page(browser, ui_server, version)
        # The source run's name arrives in a second request after the page has rendered.
        WebDriverWait(browser, WAIT_S).until(
            EC.text_to_be_present_in_element((By.TAG_NAME, "body"), run_name)
        )
        text = browser.find_element(By.TAG_NAME, "body").text
        assert f"Version {version}" in text
        assert "ccflow cell counter: c-resunet" in text  # description
        assert run_name in text  # source run
        assert "eval_det_f1" in text  # metrics, as version tags
        assert "data_fingerprint" in text
        assert "Inputs (1)" in text  # signature
    except Exception:
        browser.save_screenshot(str(tmp_path / "version-page.png"))
        raise


def test_logged_model_carries_metrics(trained_fnc_model):
    # The version page's "Source Model" link opens the logged model, whose metrics
    # MLflow 3 links from the run when the model is logged.
    client = mlflow.MlflowClient()
    source = client.get_model_version(REGISTERED_MODEL_NAME, trained_fnc_model.model_version).source
    model = client.get_logged_model(source.removeprefix("models:/"))

    assert "eval_det_f1" in {metric.key for metric in model.metrics}


def test_champion_alias_set_in_ui(browser, ui_server, trained_fnc_model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    client = mlflow.MlflowClient()
    version = trained_fnc_model.model_version
    try:
        client.delete_registered_model_alias(REGISTERED_MODEL_NAME, CHAMPION_ALIAS)
    except mlflow.exceptions.MlflowException:
        pass  # no champion yet
    wait = WebDriverWait(browser, WAIT_S)

    try:
        _open_version_page(browser, ui_server, version)
        browser.find_element(By.CSS_SELECTOR, "button[title='Add aliases']").click()
        dialog = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "[role='dialog']")))
        alias_box = dialog.find_element(By.CSS_SELECTOR, "input[role='combobox']")
        alias_box.send_keys(CHAMPION_ALIAS)
        alias_box.send_keys(Keys.ENTER)
        save = "button[data-component-id='mlflow.edit-aliases-modal.save-button']"
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, save))).click()
        wait.until(EC.invisibility_of_element_located((By.CSS_SELECTOR, "[role='dialog']")))
        wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), f"@ {CHAMPION_ALIAS}"))
    except Exception:
        browser.save_screenshot(str(tmp_path / "alias.png"))
        raise

    resolved = client.get_model_version_by_alias(REGISTERED_MODEL_NAME, CHAMPION_ALIAS)
    assert str(resolved.version) == str(version)
    source = client.get_model_version(REGISTERED_MODEL_NAME, version).source
    champion_info = mlflow.models.get_model_info(f"models:/{REGISTERED_MODEL_NAME}@{CHAMPION_ALIAS}")
    assert champion_info.model_id == source.removeprefix("models:/")
